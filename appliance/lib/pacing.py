"""Refusals a client keeps provoking, answered slowly past a limit per client address.

Some refusals cost the appliance work each time, however early they come, and a well-behaved client does not
provoke them again and again: a body past the size limit (413), a body nested too deeply (400 ``json_too_deep``),
an upload while the tenant's ingestion slots are all taken (429 ``too_many_ingestions``). A client that sends
the next one as soon as the last is refused (a flood) is paced by how fast it is refused: made cheap, refusals
only let it send more, and on a node with two cores its hundreds per second slowed every other tenant's answers
several times over (``bench/floods.py``). Past ``limit`` such refusals in ``window_s`` seconds from one address
(or past its multiple from one IPv6 network: :mod:`appliance.lib.addresses`), each further one is held by the
:class:`~appliance.lib.tarpit.Tarpit` (``identity.refusal_delay_s``) before it is answered, which paces a
flooder to one request per delay per connection; the tarpit bounds how many it holds.

Marked where errors become responses (:func:`mark_paced`, ``appliance.lib.http``); held here, on the way out,
before the response starts. A client behind the same address as a flooder is held only for refusals of its own
of these kinds: its other requests are answered as usual. Counts are per gateway process, as the other limits."""

from __future__ import annotations

from collections.abc import Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.lib.addresses import ClientCounts, ClientNetworks
from appliance.lib.tarpit import Tarpit

_STATE_KEY = "appliance_paced_refusal"


def mark_paced(scope: Scope) -> None:
    """This request's answer is a refusal of a paced kind."""
    scope.setdefault("state", {})[_STATE_KEY] = True


class RefusalPacer:
    def __init__(self, limit: int, window_s: float, tarpit: Tarpit, networks: ClientNetworks | None = None) -> None:
        self._recent = ClientCounts(limit, window_s, networks)
        self._tarpit = tarpit

    async def pace(self, address: str) -> None:
        """Count one paced refusal for ``address``; held first when the address is past its limit (so that a
        client that keeps going stays held until it has stopped for a window)."""
        past_limit = self._recent.wait(address) > 0
        self._recent.add(address)
        if past_limit:
            await self._tarpit.hold()


def refusal_pacing_middleware(pacer: RefusalPacer) -> Callable[[ASGIApp], ASGIApp]:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def paced(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return

            async def send_paced(message: Message) -> None:
                if message["type"] == "http.response.start" and scope.get("state", {}).get(_STATE_KEY):
                    client = scope.get("client")
                    if client:
                        await pacer.pace(client[0])
                await send(message)

            await app(scope, receive, send_paced)

        return paced

    return middleware

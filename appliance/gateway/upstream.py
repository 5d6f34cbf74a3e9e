"""Which engine serves a request, and the calls to it (over :mod:`appliance.lib.httpclient`'s pooled connections)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from appliance.lib.errors import (
    EngineUnavailableError,
    ModelNotFoundError,
    UpstreamError,
    UpstreamRequestError,
)
from appliance.lib.httpclient import Answer, EngineClient, HTTPClientError, PoolBusy
from appliance.lib.tracing import outgoing_traceparent
from appliance.settings import EngineRoute, GatewaySettings

_MAX_ENGINE_MESSAGE = 2000


@dataclass(frozen=True, slots=True)
class EngineHealth:
    model: str
    url: str
    healthy: bool
    error: str | None = None
    runner: str = "generate"


class Lease:
    """A request's share of an engine's load; released exactly once when the request ends."""

    __slots__ = ("_load", "_released", "_url")

    def __init__(self, load: dict[str, int], url: str) -> None:
        self._load, self._url, self._released = load, url, False
        load[url] = load.get(url, 0) + 1

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._load[self._url] -= 1


class EngineRouter:
    """Knows which engines serve which model, picks one for each request, and talks to them over one pooled
    client.

    With several engines for a model, a chat session (``X-Session-Id``) stays on the engine it started on, so
    its growing prefix is found in that engine's prefix cache; a new session, or one whose engine is passed
    over (it refused a connection a moment ago), goes to the engine with the fewest requests in flight.
    """

    def __init__(self, settings: GatewaySettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._by_model: dict[str, list[EngineRoute]] = {}
        for route in settings.routes:
            self._by_model.setdefault(route.model, []).append(route)
        self._load: dict[str, int] = {}  # engine url -> requests in flight through this gateway
        self._down_until: dict[str, float] = {}
        self._affinity: OrderedDict[tuple[str | None, str, str], tuple[str, float]] = OrderedDict()
        self._turn = 0
        self._client: EngineClient | None = None

    async def start(self) -> None:
        settings = self._settings
        self._client = EngineClient(settings.pool_size, settings.connect_timeout_s, settings.read_timeout_s)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def routes(self) -> list[EngineRoute]:
        return [route for routes in self._by_model.values() for route in routes]

    def route(self, model: str, session: str | None = None, tenant_id: str | None = None) -> EngineRoute:
        """The engine for a request: its session's engine if it has one, else the least loaded."""
        candidates = self._by_model.get(model)
        if not candidates:
            raise ModelNotFoundError(model)
        if len(candidates) == 1:
            return candidates[0]
        now = self._clock()
        up = [route for route in candidates if self._down_until.get(route.url, 0.0) <= now] or candidates
        key = (tenant_id, model, session) if session else None
        if key is not None:
            remembered = self._affinity.get(key)
            if remembered is not None and now - remembered[1] <= self._settings.session_affinity_ttl_s:
                chosen = next((route for route in up if route.url == remembered[0]), None)
                if chosen is not None:
                    self._affinity[key] = (chosen.url, now)
                    self._affinity.move_to_end(key)
                    return chosen
        self._turn += 1
        count = len(up)
        chosen = min(
            (up[(self._turn + offset) % count] for offset in range(count)),
            key=lambda route: self._load.get(route.url, 0),
        )
        if key is not None:
            self._affinity[key] = (chosen.url, now)
            self._affinity.move_to_end(key)
            while len(self._affinity) > self._settings.session_affinity_entries:
                self._affinity.popitem(last=False)
        return chosen

    def set_model_routes(self, model: str, routes: list[EngineRoute]) -> None:
        """Point ``model`` at ``routes`` from now on (the model registry's deployments; none: the model is gone).

        Requests already routed keep the route they were given, so they finish on the engine they started on."""
        if routes:
            self._by_model[model] = list(routes)
        else:
            self._by_model.pop(model, None)

    def lease(self, route: EngineRoute) -> Lease:
        return Lease(self._load, route.url)

    def load(self) -> dict[str, int]:
        return {route.key: self._load.get(route.url, 0) for route in self.routes}

    def _mark_down(self, route: EngineRoute) -> None:
        self._down_until[route.url] = self._clock() + self._settings.engine_down_s

    @property
    def client(self) -> EngineClient:
        if self._client is None:
            raise EngineUnavailableError("The gateway is not started.")
        return self._client

    @staticmethod
    def _headers(request_id: str) -> list[tuple[str, str]]:
        headers = [("Content-Type", "application/json"), ("X-Request-Id", request_id)]
        traceparent = outgoing_traceparent()
        if traceparent is not None:
            headers.append(("traceparent", traceparent))
        return headers

    async def open(
        self, route: EngineRoute, path: str, body: bytes | None, request_id: str, method: str = "POST"
    ) -> Answer:
        """POST ``body`` to the engine (or ``method`` it); return its answer once its status is 200.

        The caller owns the answer and must ``release()`` it. Errors are mapped here.
        """
        try:
            answer = await self.client.request(route.url, method, path, self._headers(request_id), body)
        except PoolBusy as exc:
            raise EngineUnavailableError(
                f"The engine serving `{route.model}` has no free connection; try again.", code="engine_busy"
            ) from exc
        except TimeoutError as exc:
            self._mark_down(route)
            raise EngineUnavailableError(
                f"The engine serving `{route.model}` did not answer in time.", code="engine_timeout"
            ) from exc
        except (HTTPClientError, OSError) as exc:
            self._mark_down(route)
            raise EngineUnavailableError(
                f"The engine serving `{route.model}` is unavailable.", code="engine_unavailable"
            ) from exc
        if answer.status != 200:
            try:
                raw = await answer.read()
            except (TimeoutError, HTTPClientError):
                raw = b""
            finally:
                answer.release()
            raise engine_error(route.model, answer.status, raw)
        return answer

    async def fetch(self, url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        """``GET`` an engine's ``path`` (health, metrics): its status and body, within ``timeout_s``. Raises
        ``HTTPClientError``, ``TimeoutError`` or ``OSError``."""
        async with asyncio.timeout(timeout_s):
            answer = await self.client.request(url, "GET", path, [], pooled=False)
            try:
                return answer.status, await answer.read()
            finally:
                answer.release()

    async def count_prompt_tokens(self, route: EngineRoute, data: dict[str, Any], request_id: str) -> int:
        """One text's (``prompt``) or chat's (``messages``) token count from the engine's own tokenizer, chat
        template included (vLLM /tokenize). Requests are counted by :mod:`appliance.gateway.counting`."""
        if isinstance(data.get("messages"), list):
            body = {"model": route.model, "messages": data["messages"], "add_generation_prompt": True}
        else:
            body = {"model": route.model, "prompt": str(data.get("prompt", ""))}
        count, _ = await self.tokenize(route, body, request_id)
        return count

    async def tokenize(self, route: EngineRoute, body: dict[str, Any], request_id: str) -> tuple[int, dict[str, Any]]:
        """The engine's ``/tokenize`` of ``body``: its count, and its whole answer (``max_model_len``...). An answer
        without a count is an ``UpstreamError``."""
        answer = await self.open(route, "/tokenize", msgspec.json.encode(body), request_id)
        raw = await read_answer(answer, route.model)
        try:
            decoded = msgspec.json.decode(raw)
            return int(decoded["count"]), decoded
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"The engine serving `{route.model}` could not count the prompt.") from exc

    async def health(self, route: EngineRoute) -> EngineHealth:
        try:
            status, _ = await self.fetch(route.url, "/health", self._settings.health_timeout_s)
        except (TimeoutError, HTTPClientError, OSError) as exc:
            return EngineHealth(route.model, route.url, False, type(exc).__name__, route.runner)
        if status == 200:
            return EngineHealth(route.model, route.url, True, runner=route.runner)
        return EngineHealth(route.model, route.url, False, f"health answered {status}", route.runner)

    async def health_all(self) -> list[EngineHealth]:
        return list(await asyncio.gather(*(self.health(route) for route in self.routes)))


async def read_answer(answer: Answer, model: str) -> bytes:
    """An engine's whole answer, and the answer released. One that breaks off is an ``UpstreamError``; a caller that
    is cancelled (its client left) closes the connection, so vLLM aborts the request."""
    try:
        return await answer.read()
    except (TimeoutError, HTTPClientError) as exc:
        raise UpstreamError(f"The engine serving `{model}` broke off its answer.") from exc
    finally:
        answer.release()


def engine_error(model: str, status: int, raw: bytes) -> UpstreamError | UpstreamRequestError:
    """Map an engine's non-200 answer: its 4xx are the client's fault (passed on), the rest are 502."""
    message, param = _engine_message(raw)
    if 400 <= status < 500 and status not in (401, 403, 407, 408, 429):
        return UpstreamRequestError(status, message or f"The engine refused the request ({status}).", param=param)
    detail = f": {message}" if message else ""
    return UpstreamError(f"The engine serving `{model}` failed with status {status}{detail}")


def _engine_message(raw: bytes) -> tuple[str, str | None]:
    try:
        data: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw[:_MAX_ENGINE_MESSAGE].decode("utf-8", "replace").strip(), None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = str(error.get("message") or "")[:_MAX_ENGINE_MESSAGE]
            param = error.get("param")
            return message, param if isinstance(param, str) else None
        if isinstance(error, str):
            return error[:_MAX_ENGINE_MESSAGE], None
    return "", None

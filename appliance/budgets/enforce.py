"""Budget enforcement on the /v1 path: before generation, reserve along the principal's chain (clamping
max_tokens); after it, settle with the real usage. Fails closed: if budgets cannot be evaluated the
request is refused (503), never served unmetered."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from appliance.budgets.ratelimit import ratelimit_headers
from appliance.budgets.store import BudgetStore, CallLink, Grant
from appliance.identity.principal import Principal
from appliance.ledger.pricing import Price
from appliance.lib.errors import ApplianceError, ServiceUnavailableError

log = logging.getLogger(__name__)

CLAMP_HEADER = "x-budget-max-tokens"
CALL_LIMITS = frozenset({"max_retries", "max_depth"})
RESERVING = frozenset({"tokens", "requests", "cost", "max_tokens"})
COUNTS_PROMPT = frozenset({"tokens", "cost"})


def chain_of(principal: Principal) -> dict[str, str]:
    scopes = {
        "api_key": principal.api_key_id,
        "agent": principal.agent_id,
        "workflow": principal.workflow_id,
        "tenant": principal.tenant_id,
    }
    return {scope: ident for scope, ident in scopes.items() if ident}


@dataclass
class Hold:
    """A request's reservation; settle it exactly once."""

    store: BudgetStore
    request_id: str
    grant: Grant
    settled: bool = False

    async def settle(self, total_tokens: int, cost_micros: int, reached_engine: bool) -> None:
        """Settle now; a settlement the database refuses is journaled and replayed (never dropped)."""
        if self.settled or not self.grant.reserved:
            return
        self.settled = True
        await asyncio.to_thread(
            self.store.settle_durably, self.request_id, total_tokens, cost_micros, counts_as_call=reached_engine
        )

    def settle_soon(self, total_tokens: int, cost_micros: int, reached_engine: bool) -> None:
        """For code that may not await (a request being cancelled): settle in a worker thread."""
        if self.settled or not self.grant.reserved:
            return
        self.settled = True
        self.store.announce_settlement()  # a shutdown from now on waits for it
        asyncio.get_running_loop().run_in_executor(
            None,
            lambda: self.store.settle_durably(
                self.request_id, total_tokens, cost_micros, counts_as_call=reached_engine, announced=True
            ),
        )


@dataclass
class Admission:
    """What admission decided: the retry attempt, the depth, the reservation, the output cap per sequence and
    headers for the answer."""

    attempt: int = 0
    depth: int = 0
    hold: Hold | None = None
    cap: int | None = None  # per sequence, as clamped by the budgets (None: as asked)
    headers: dict[str, str] = field(default_factory=dict)


class BudgetEnforcer:
    def __init__(self, store: BudgetStore) -> None:
        self.store = store

    async def enforce(
        self,
        principal: Principal,
        request_id: str,
        link: CallLink,
        price: Price,
        count: Callable[[], Awaitable[int]],
        cap: int,
        sequences: int,
    ) -> Admission:
        """Admit the request against every budget of its chain before generation. The engine may produce
        ``sequences`` outputs of ``cap`` tokens each (0 sequences: embeddings); all of it is reserved, and the
        cap per sequence lowered to what the tightest budget leaves. ``count`` gives the prompt's tokens (asked
        only where a budget needs them). One read finds which budgets apply; a chain without budgets costs no
        write."""
        chain = chain_of(principal)
        if not chain:
            return Admission()
        try:
            kinds = await asyncio.to_thread(self.store.applicable, chain)
            admission = Admission()
            if kinds & CALL_LIMITS or link.any:
                admission.attempt, admission.depth = await asyncio.to_thread(
                    self.store.admit, request_id, chain, link, strict=frozenset(kinds & CALL_LIMITS)
                )
            if kinds & RESERVING:
                prompt_tokens = 0
                if kinds & COUNTS_PROMPT:
                    prompt_tokens = await count()
                grant = await self._reserve(
                    request_id,
                    functools.partial(
                        self.store.reserve,
                        request_id,
                        chain,
                        prompt_tokens,
                        cap * sequences,
                        price,
                        min_output=sequences,
                    ),
                )
                admission.hold = Hold(self.store, request_id, grant)
                admission.headers.update(ratelimit_headers(grant))
                if sequences and grant.clamped and grant.max_tokens is not None:
                    admission.cap = grant.max_tokens // sequences
                    admission.headers[CLAMP_HEADER] = str(admission.cap)
            return admission
        except ApplianceError as exc:
            if exc.status_code < 500:
                raise  # refused by a budget, or the request itself is invalid (an unknown parent, say)
            log.warning("budget evaluation failed: %s", exc.message)
            raise _unavailable() from exc
        except Exception as exc:
            log.exception("budget evaluation failed")
            raise _unavailable() from exc

    async def _reserve(self, request_id: str, reserve: Callable[[], Grant]) -> Grant:
        """The reservation, in a worker thread. A request cancelled while it runs (its client left) does not stop
        the thread: the reservation still lands, with nobody to settle it, and a live gateway's reservations are
        never swept. So it is settled at nothing (the engine was never asked) as soon as it lands."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, reserve)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:

            def release(done: asyncio.Future[Grant]) -> None:
                if done.cancelled() or done.exception() is not None or not done.result().reserved:
                    return
                self.store.announce_settlement()  # a shutdown waits for it
                settle = functools.partial(
                    self.store.settle_durably, request_id, 0, 0, counts_as_call=False, announced=True
                )
                loop.run_in_executor(None, settle)

            future.add_done_callback(release)
            raise


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "Budgets could not be evaluated; the request was not served.", code="budget_unavailable"
    )

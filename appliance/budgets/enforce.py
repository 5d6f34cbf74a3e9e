"""Budget enforcement on the /v1 path: before generation, reserve along the principal's chain (clamping
max_tokens) from this process's leases (``leases.py``); after it, settle with the real usage.
Fails closed: if budgets cannot be evaluated the request is refused (503), never served unmetered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from appliance.budgets.leases import BudgetLeases, LeasedHold
from appliance.budgets.ratelimit import ratelimit_headers
from appliance.budgets.store import BudgetStore, CallLink
from appliance.ledger.pricing import Price
from appliance.lib.errors import ApplianceError, ServiceUnavailableError
from appliance.lib.principal import Principal

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
class Admission:
    """What admission decided: the retry attempt, the depth, the reservation, the output cap per sequence and
    headers for the answer."""

    attempt: int = 0
    depth: int = 0
    hold: LeasedHold | None = None
    cap: int | None = None  # per sequence, as clamped by the budgets (None: as asked)
    headers: dict[str, str] = field(default_factory=dict)


class BudgetEnforcer:
    def __init__(self, store: BudgetStore, leases: BudgetLeases) -> None:
        self.store = store
        self.leases = leases

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
        ``sequences`` outputs of ``cap`` tokens each (0 sequences: embeddings); all of it is reserved (from this
        process's leases), and the cap per sequence lowered to what the tightest budget leaves. ``count`` gives
        the prompt's tokens (asked only where a budget needs them). Which budgets apply is known from memory
        (looked up again every second); a chain without budgets costs nothing."""
        chain = chain_of(principal)
        if not chain:
            return Admission()
        try:
            kinds = {rule["kind"] for rule in await self.leases.rules(chain)}
            admission = Admission()
            if kinds & CALL_LIMITS or link.any:
                admission.attempt, admission.depth = await asyncio.to_thread(
                    self.store.admit, request_id, chain, link, strict=frozenset(kinds & CALL_LIMITS)
                )
            if kinds & RESERVING:
                prompt_tokens = await count() if kinds & COUNTS_PROMPT else 0
                hold = await self.leases.reserve(chain, prompt_tokens, cap * sequences, price, min_output=sequences)
                if hold is not None:
                    admission.hold = hold
                    admission.headers.update(ratelimit_headers(hold.grant))
                    grant = hold.grant
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


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "Budgets could not be evaluated; the request was not served.", code="budget_unavailable"
    )

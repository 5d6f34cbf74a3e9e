"""Answers retrieval gives without an engine call (a repeated query, from the cache) are requests too: each is
admitted against the caller's budgets (`requests` and the per-call limits; a token or money budget with
nothing left refuses it as well) and leaves a usage row and an audit record naming its collection, as the
uncached path's engine call does through the gateway's serving path. It embeds nothing, so it is charged no
tokens and no money."""

from __future__ import annotations

import asyncio
import time

from appliance.audit.writer import AuditWriter
from appliance.budgets.enforce import BudgetEnforcer
from appliance.budgets.store import CallLink
from appliance.gateway.settlement import Settlement, Source, settle
from appliance.ledger.writer import UsageEvent, UsageWriter
from appliance.lib.principal import Principal
from appliance.settings import EngineRoute

CLIENT_CLOSED_REQUEST = 499
COLLECTION = "rag.collection"  # the audit record's object type


async def _nothing_to_count() -> int:
    return 0  # a cached answer sends no prompt to an engine


class CachedAnswers:
    def __init__(self, usage: UsageWriter, audit: AuditWriter | None, budgets: BudgetEnforcer | None) -> None:
        self._usage = usage
        self._audit = audit
        self._budgets = budgets

    async def admit(
        self,
        *,
        principal: Principal,
        request_id: str,
        source: Source,
        link: CallLink,
        route: EngineRoute,
        endpoint: str,
        collection_id: str,
        query: str,
    ) -> None:
        """Admit and record one cached answer before it is given; raises (429, 503, ...) when it may not be
        given, after recording the refusal. ``route`` is the embedding engine the uncached path would use."""
        started = time.perf_counter()
        principal.require_inference()
        settlement = Settlement(await self._usage.acquire(), self._audit, source, principal.kind)
        settlement.audited_object = (COLLECTION, collection_id)
        event = UsageEvent.attributed(
            principal, request_id, endpoint, route.model, embed_ms=0.0, search_ms=0.0, retrieval_cached=True
        )
        try:
            if self._budgets is not None:
                admission = await self._budgets.enforce(
                    principal, request_id, link, settlement.price, _nothing_to_count, 0, 0
                )
                event.retry_attempt, event.depth = admission.attempt, admission.depth
                settlement.hold = admission.hold
        except asyncio.CancelledError:
            event.status_code, event.error_code = CLIENT_CLOSED_REQUEST, "client_disconnected"
            event.client_disconnected = True
            event.latency_ms = (time.perf_counter() - started) * 1000.0
            settlement.abandon(event)
            raise
        except Exception as exc:
            await settle(settlement, event, started, exc)
            raise
        await settle(settlement, event, started)

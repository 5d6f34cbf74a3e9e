"""What a /v1 request holds and what it leaves behind, settled exactly once (:class:`Settlement`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from appliance.audit.store import AuditEvent
from appliance.audit.writer import AuditWriter
from appliance.budgets.leases import LeasedHold
from appliance.budgets.store import BudgetExceededError
from appliance.gateway.admission import Ticket
from appliance.gateway.metrics import GatewayMetrics
from appliance.ledger.pricing import Price, ThroughputMeter
from appliance.ledger.writer import UsageEvent, UsageSlot
from appliance.lib.errors import ApplianceError


@dataclass(frozen=True, slots=True)
class Source:
    address: str | None = None
    user_agent: str | None = None


def audit_event(
    event: UsageEvent,
    source: Source,
    subject_kind: str | None,
    content: tuple[str, str] | None = None,
    audited_object: tuple[str, str] | None = None,
) -> AuditEvent:
    """The request's audit record; it names the model, or ``audited_object`` (type, id) where the request was
    about something else (a cached retrieval query names its collection)."""
    if event.status_code < 400:
        outcome = "success"
    elif event.status_code in (401, 403, 404, 429):
        outcome = "denied"
    else:
        outcome = "failure"
    detail = {
        "endpoint": event.endpoint,
        "status": event.status_code,
        "error_code": event.error_code,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "cost_micros": event.cost_micros,
        "streamed": event.streamed,
        "client_disconnected": event.client_disconnected,
        "workflow_id": event.workflow_id,
        "agent_id": event.agent_id,
        "api_key_id": event.api_key_id,
        "budget_id": event.budget_id,
    }
    if event.embed_ms is not None or event.chunks_injected:
        detail["retrieval"] = {
            "embed_ms": event.embed_ms,
            "search_ms": event.search_ms,
            "chunks_injected": event.chunks_injected,
            "injected_tokens": event.injected_tokens,
            "cached": event.retrieval_cached,
        }
    name = _EVENT_NAMES.get(event.endpoint) or event.endpoint.rsplit("/", 1)[-1]
    object_type, object_id = audited_object or ("model", event.model)
    if audited_object is not None:
        detail["model"] = event.model
    return AuditEvent(
        event_type=f"inference.rag.{name}" if event.endpoint.startswith("/v1/rag/") else f"inference.{name}",
        outcome=outcome,
        subject=event.subject,
        subject_kind=subject_kind,
        tenant_id=event.tenant_id,
        object_type=object_type,
        object_id=object_id,
        source_ip=source.address,
        user_agent=source.user_agent,
        request_id=event.request_id,
        detail=detail,
        content=content,
    )


_EVENT_NAMES = {  # routes whose last path segment does not name them
    "/v1/responses/{response_id}": "responses.retrieve",
    "/v1/responses/{response_id}/cancel": "responses.cancel",
}


async def settle(settlement: Settlement, event: UsageEvent, started: float, failure: Exception | None = None) -> None:
    """Close ``settlement`` with the request's outcome (200, or ``failure``'s status) and its latency since
    ``started`` (a ``time.perf_counter()`` reading)."""
    if failure is None:
        event.status_code = 200
    else:
        mark_failed(event, failure)
    event.latency_ms = (time.perf_counter() - started) * 1000.0
    await settlement.close(event)


def mark_failed(event: UsageEvent, exc: Exception) -> None:
    """The status of a request that failed before an answer: the error's own, or 500; a refusing budget is named."""
    if isinstance(exc, BudgetExceededError):
        event.budget_id = exc.param
    if isinstance(exc, ApplianceError):
        event.status_code, event.error_code = exc.status_code, exc.code
    else:
        event.status_code, event.error_code = 500, "internal_error"


def _reached_engine(event: UsageEvent) -> bool:
    """Whether the request counts as a model call (it got to the engine)."""
    return event.status_code == 200 or event.total_tokens > 0 or event.client_disconnected


class Resource(Protocol):
    """Something a request holds while it runs (an admission slot, its share of an engine's load)."""

    def release(self) -> None: ...


class Settlement:
    """Everything one /v1 request acquired, and where its outcome goes, settled exactly once.

    Resources are released in the reverse order they were acquired. The outcome (the request's
    :class:`UsageEvent`) is priced once and handed to the sinks: metrics and the node's throughput meter, the
    ledger's usage row, the budget reservation (settled with the real usage) and the audit record. Two exits:
    :meth:`close` is awaited (the answer waits for its audit record to be durable); :meth:`abandon` is
    synchronous, for a request that ends without an answer (it is being cancelled: nothing may be awaited)."""

    __slots__ = (
        "_audit",
        "_done",
        "_held",
        "_metrics",
        "_slot",
        "_source",
        "_subject_kind",
        "answer",
        "audited_object",
        "hold",
        "meter",
        "price",
        "prompt",
        "ticket",
    )

    def __init__(
        self,
        slot: UsageSlot,
        audit: AuditWriter | None,
        source: Source,
        subject_kind: str | None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._slot = slot
        self._audit = audit
        self._source = source
        self._subject_kind = subject_kind
        self._metrics = metrics
        self._done = False
        self._held: list[Resource] = []
        self.prompt: str | None = None  # set when the tenant captures content
        self.answer: list[str] = []
        self.hold: LeasedHold | None = None  # the request's budget reservation, settled with its real usage
        self.price = Price()  # fixed when the request is admitted
        self.meter: ThroughputMeter | None = None  # set once the request is on its way to an engine
        self.ticket: Ticket | None = None  # its admission slot (also held: given back early at the first token)
        self.audited_object: tuple[str, str] | None = None  # what its audit record names, if not the model

    def acquire(self, resource: Resource) -> None:
        """Hold ``resource`` until the request is settled."""
        self._held.append(resource)

    def admitted(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.acquire(ticket)

    def metering(self, meter: ThroughputMeter) -> None:
        """The request is on its way to an engine: its time counts as the node's busy time until it ends."""
        meter.begin()
        self.meter = meter

    def first_token(self) -> None:
        """The engine has finished this request's prefill: a slot held only for prefills is given back."""
        if self.ticket is not None and self.ticket.until_first_token:
            self.ticket.release()

    @property
    def capturing(self) -> bool:
        return self.prompt is not None

    async def close(self, event: UsageEvent) -> None:
        """Settle, and return once the usage row and the audit record are both durable: in this process's
        journals, or committed where there are none (the answer waits for them: a process killed after answering
        loses neither)."""
        if self._done:
            return
        row = self._settle(event, durable=True)
        # Both are under way once handed over: waiting for one after the other costs the longer of the two.
        if self._audit is not None:
            await self._audit.record(self._audit_event(event))
        await self._slot.committed(row)

    def abandon(self, event: UsageEvent) -> None:
        if self._done:
            return
        self._settle(event)
        if self._audit is not None:
            self._audit.record_nowait(self._audit_event(event))

    def _settle(self, event: UsageEvent, durable: bool = False) -> asyncio.Future[None] | None:
        """Release what is held and hand the outcome to every sink but the audit log; with ``durable``, the
        future of the usage row's commit."""
        self._done = True
        event.cost_micros = self.price.cost(event.prompt_tokens, event.completion_tokens)
        while self._held:
            self._held.pop().release()
        if self.meter is not None:
            self.meter.end(event.total_tokens)
        if self._metrics is not None:
            self._metrics.observe(event)
        row = self._slot.submit(event, durable=durable)
        if self.hold is not None:
            self.hold.settle(event.total_tokens, event.cost_micros, reached_engine=_reached_engine(event))
        return row

    def _audit_event(self, event: UsageEvent) -> AuditEvent:
        content = (self.prompt, "".join(self.answer)) if self.prompt is not None else None
        return audit_event(event, self._source, self._subject_kind, content, self.audited_object)

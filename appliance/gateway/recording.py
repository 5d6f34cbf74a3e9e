"""What a /v1 request leaves behind: its usage row and its audit record, written exactly once.

:meth:`RequestRecord.commit` is awaited before a request is answered (its audit record is then durable);
:meth:`RequestRecord.finish` is synchronous, for requests that end without an answer (cancellation)."""

from __future__ import annotations

from dataclasses import dataclass

from appliance.audit.store import AuditEvent
from appliance.audit.writer import AuditWriter
from appliance.budgets.leases import LeasedHold
from appliance.budgets.store import BudgetExceededError
from appliance.gateway.admission import Ticket
from appliance.gateway.metrics import GatewayMetrics
from appliance.gateway.upstream import Lease
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
    name = event.endpoint.rsplit("/", 1)[-1]
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


class RequestRecord:
    __slots__ = (
        "_audit",
        "_done",
        "_metrics",
        "_slot",
        "_source",
        "_subject_kind",
        "answer",
        "audited_object",
        "hold",
        "lease",
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
        self.prompt: str | None = None  # set when the tenant captures content
        self.answer: list[str] = []
        self.hold: LeasedHold | None = None  # the request's budget reservation, settled with its real usage
        self.price = Price()  # fixed when the request is admitted
        self.meter: ThroughputMeter | None = None  # set once the request is on its way to an engine
        self.ticket: Ticket | None = None  # its admission slot, freed when it ends
        self.lease: Lease | None = None  # its share of the engine's load (for least-loaded routing)
        self.audited_object: tuple[str, str] | None = None  # what its audit record names, if not the model

    def _account(self, event: UsageEvent) -> None:
        """Price the request, and end its share of the node's measured busy time."""
        event.cost_micros = self.price.cost(event.prompt_tokens, event.completion_tokens)
        if self.ticket is not None:
            self.ticket.release()
        if self.lease is not None:
            self.lease.release()
        if self.meter is not None:
            self.meter.end(event.total_tokens)
            self.meter = None
        if self._metrics is not None:
            self._metrics.observe(event)

    def first_token(self) -> None:
        """The engine has finished this request's prefill: a slot held only for prefills is given back."""
        if self.ticket is not None and self.ticket.until_first_token:
            self.ticket.release()

    @property
    def capturing(self) -> bool:
        return self.prompt is not None

    def _content(self) -> tuple[str, str] | None:
        return (self.prompt, "".join(self.answer)) if self.prompt is not None else None

    async def commit(self, event: UsageEvent) -> None:
        if self._done:
            return
        self._done = True
        self._account(event)
        self._slot.submit(event)
        if self.hold is not None:
            self.hold.settle(event.total_tokens, event.cost_micros, reached_engine=_reached_engine(event))
        if self._audit is not None:
            await self._audit.record(
                audit_event(event, self._source, self._subject_kind, self._content(), self.audited_object)
            )

    def finish(self, event: UsageEvent) -> None:
        if self._done:
            return
        self._done = True
        self._account(event)
        self._slot.submit(event)
        if self.hold is not None:
            self.hold.settle(event.total_tokens, event.cost_micros, reached_engine=_reached_engine(event))
        if self._audit is not None:
            self._audit.record_nowait(
                audit_event(event, self._source, self._subject_kind, self._content(), self.audited_object)
            )

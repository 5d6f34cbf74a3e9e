"""Group commit of audit events: callers that must not answer before their record is durable await
:meth:`AuditWriter.record`; many such callers share one transaction. :meth:`record_nowait` queues an
event without waiting (for events whose request is not answered, such as a client that went away).

A batch that fails because of the database (down, locked, full) is retried as it is; until it is written,
:meth:`AuditWriter.check_accepting` refuses new requests at once (503) instead of letting them reach an engine and
wait for a record that cannot be written. A batch that fails
because of its data is split until the one record the database refuses is found; that record is replaced by
a well-formed ``audit.record_rejected`` record in its place in the chain (so the chain still accounts for it)
and the rest are written: one bad record never holds up the others."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import UTC, datetime

from appliance.audit.store import AuditEvent, AuditStore
from appliance.db.faults import is_transient
from appliance.lib.errors import ServiceUnavailableError

log = logging.getLogger(__name__)


class AuditWriter:
    def __init__(
        self, store: AuditStore, *, batch_size: int = 1000, checkpoint_interval_s: float = 60.0, timeout_s: float = 10.0
    ) -> None:
        self.store = store
        self._batch_size = batch_size
        self._checkpoint_interval_s = checkpoint_interval_s
        self._timeout_s = timeout_s
        self._pending: list[tuple[AuditEvent, asyncio.Future[int] | None]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing = False  # the last append failed: records wait in the queue for the database

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        await asyncio.to_thread(self.store.checkpoint)

    async def record(self, event: AuditEvent) -> int:
        """Append ``event``; returns once it is committed (its sequence number). Fails closed: 503."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        except TimeoutError:
            raise ServiceUnavailableError("The audit log is not accepting records.", code="audit_unavailable") from None

    def check_accepting(self) -> None:
        """Refuse (503) while the log cannot take records: the last append failed and is being retried. Work that
        must be recorded is refused before it starts, not after it was done."""
        if self._failing:
            raise ServiceUnavailableError("The audit log is not accepting records.", code="audit_unavailable")

    def record_nowait(self, event: AuditEvent) -> None:
        self._pending.append((event, None))
        self._wakeup.set()

    async def _run(self) -> None:
        backoff = 0.05
        last_checkpoint = time.monotonic()
        while True:
            if not self._pending:
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
                except TimeoutError:
                    pass
                self._wakeup.clear()
                if time.monotonic() - last_checkpoint >= self._checkpoint_interval_s:
                    last_checkpoint = time.monotonic()
                    await self._checkpoint()
                continue
            batch = self._pending[: self._batch_size]
            try:
                await self._append(batch)
            except Exception:
                if not self._failing:
                    log.exception("appending %d audit records failed; retrying, and refusing new work", len(batch))
                self._failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if self._failing:
                log.warning("the audit log accepts records again")
            self._failing = False
            backoff = 0.05

    async def _append(self, batch: list[tuple[AuditEvent, asyncio.Future[int] | None]]) -> None:
        """Append ``batch`` (the head of the queue), isolating a record the database refuses. What is committed
        leaves the queue at once, so a failure part-way (raised to be retried) never writes a record twice."""
        try:
            seqs = await asyncio.to_thread(self.store.append, [event for event, _ in batch])
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(batch) > 1:
                middle = len(batch) // 2
                await self._append(batch[:middle])
                await self._append(batch[middle:])
                return
            log.error(
                "an audit record was refused (%s: %s); it is replaced by a record saying so", type(exc).__name__, exc
            )
            seqs = await asyncio.to_thread(self.store.append, [rejected(batch[0][0], exc)])  # raises: retried
        del self._pending[: len(batch)]
        for (_, future), seq in zip(batch, seqs, strict=True):
            if future is not None and not future.done():
                future.set_result(seq)

    async def _checkpoint(self) -> None:
        try:
            await asyncio.to_thread(self.store.checkpoint)
        except Exception:
            log.exception("signing an audit checkpoint failed")


def rejected(event: AuditEvent, exc: BaseException) -> AuditEvent:
    """The record that takes the place of one the database refused: who, when and what (as far as those are
    text), the error, and a fingerprint of the refused record."""

    def text(value: object) -> str | None:
        return value if isinstance(value, str) else None

    return AuditEvent(
        event_type="audit.record_rejected",
        outcome="failure",
        component="audit",
        subject=text(event.subject),
        subject_kind=text(event.subject_kind),
        tenant_id=text(event.tenant_id),
        source_ip=text(event.source_ip),
        request_id=text(event.request_id),
        ts=event.ts if isinstance(event.ts, datetime) else datetime.now(UTC),
        detail={
            "event_type": text(event.event_type),
            "outcome": text(event.outcome),
            "error": type(exc).__name__,
            "record_sha256": hashlib.sha256(repr(event).encode("utf-8", "replace")).hexdigest(),
        },
    )

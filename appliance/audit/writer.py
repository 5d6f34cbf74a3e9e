"""Group commit of audit events: callers that must not answer before their record is durable await
:meth:`AuditWriter.record`; many such callers share one transaction. :meth:`record_nowait` queues an
event without waiting (for events whose request is not answered, such as a client that went away).

With a journal (``appliance/lib/journal.py``, the gateway's case), a record is durable once it is appended to
this process's journal: :meth:`AuditWriter.record` returns then, and the record reaches the chain in the next
group commit (every ``flush_interval_s``, or once ``batch_size`` records wait), which also commits how far the
journal is appended; a dead process's journal is appended past that mark by the next writer that finds it.

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

import msgspec

from appliance.audit.store import AuditEvent, AuditStore
from appliance.db.faults import is_transient
from appliance.lib.barriers import CountBarriers
from appliance.lib.errors import ServiceUnavailableError
from appliance.lib.journal import Journal, adopt, journaled, retire

log = logging.getLogger(__name__)


class AuditWriter:
    def __init__(
        self,
        store: AuditStore,
        *,
        batch_size: int = 1000,
        checkpoint_interval_s: float = 60.0,
        timeout_s: float = 10.0,
        journal: Journal | None = None,
        flush_interval_s: float = 0.2,
        adopt_interval_s: float = 5.0,
    ) -> None:
        self.store = store
        self._batch_size = batch_size
        self._checkpoint_interval_s = checkpoint_interval_s
        self._timeout_s = timeout_s
        self._journal = journal
        self._flush_interval_s = flush_interval_s if journal is not None else 1.0
        self._adopt_interval_s = adopt_interval_s
        self._appended = 0  # records committed by this writer
        self._flushes = CountBarriers()  # who waits for every record handed over by then to be appended
        # Queued events: who waits for their commit (None: nobody, or journaled), and their journal entry.
        self._pending: list[tuple[AuditEvent, asyncio.Future[int] | None, int | None]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing = False  # the last append failed: records wait in the queue for the database

    async def start(self) -> None:
        if self._journal is not None:
            await asyncio.to_thread(self._journal.open)
            await asyncio.to_thread(self._adopt)
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._journal is not None:
            await asyncio.to_thread(self._adopt)
            await asyncio.to_thread(self._close_journal)
        await asyncio.to_thread(self.store.settle)  # a checkpoint of the interval still signing
        await asyncio.to_thread(self.store.checkpoint)

    async def record(self, event: AuditEvent) -> int:
        """Append ``event``; returns once it is durable: in the journal (its entry number; with the journal's
        ``fsync``, once on the disk), or without one, committed to the chain (its sequence number). Fails
        closed: 503."""
        seq = journaled(self._journal, event)
        if seq is not None:
            assert self._journal is not None
            self._pending.append((event, None, seq))
            if len(self._pending) >= self._batch_size:
                self._wakeup.set()
            if self._journal.syncs:
                await self._journal.durable(seq)
            return seq
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future, None))
        self._wakeup.set()
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        except TimeoutError:
            raise ServiceUnavailableError("The audit log is not accepting records.", code="audit_unavailable") from None

    async def flush(self) -> None:
        """Return once every record handed over so far is in the chain (a search made after a request finds its
        record: records are journaled, and appended in groups after the answer). Fails closed: 503."""
        if not self._pending or self._task is None:
            return
        future = self._flushes.at(self._appended + len(self._pending))
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        except TimeoutError:
            raise ServiceUnavailableError("The audit log is not accepting records.", code="audit_unavailable") from None

    def check_accepting(self) -> None:
        """Refuse (503) while the log cannot take records: the last append failed and is being retried. Work that
        must be recorded is refused before it starts, not after it was done."""
        if self._failing or (self._journal is not None and not self._journal.accepting()):
            raise ServiceUnavailableError("The audit log is not accepting records.", code="audit_unavailable")

    def record_nowait(self, event: AuditEvent) -> None:
        seq = journaled(self._journal, event)
        self._pending.append((event, None, seq))
        if seq is None or len(self._pending) >= self._batch_size:
            self._wakeup.set()

    async def _run(self) -> None:
        backoff = 0.05
        last_checkpoint = adopted = time.monotonic()
        while True:
            if self._journal is not None and time.monotonic() - adopted >= self._adopt_interval_s:
                adopted = time.monotonic()
                await asyncio.to_thread(self._adopt)
            if not self._pending:
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=self._flush_interval_s)
                except TimeoutError:
                    pass
                self._wakeup.clear()
                if time.monotonic() - last_checkpoint >= self._checkpoint_interval_s:
                    last_checkpoint = time.monotonic()
                    try:
                        self.store.checkpoint_in_background()  # appends go on while the tree grows
                    except Exception:  # no thread to be had: the next interval tries again
                        log.exception("starting an audit checkpoint failed")
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

    async def _append(self, batch: list[tuple[AuditEvent, asyncio.Future[int] | None, int | None]]) -> None:
        """Append ``batch`` (the head of the queue), isolating a record the database refuses. What is committed
        leaves the queue at once, so a failure part-way (raised to be retried) never writes a record twice."""
        entries = [entry for _, _, entry in batch]
        journal = self._journal.name if self._journal is not None else None
        try:
            seqs = await asyncio.to_thread(
                _append_isolating, self.store, [event for event, _, _ in batch], journal, entries
            )
        except Exception as exc:
            if is_transient(exc) or len(batch) == 1:
                raise
            middle = len(batch) // 2
            await self._append(batch[:middle])
            await self._append(batch[middle:])
            return
        del self._pending[: len(batch)]
        for (_, future, _), seq in zip(batch, seqs, strict=True):
            if future is not None and not future.done():
                future.set_result(seq)
        self._appended += len(batch)
        self._flushes.reached(self._appended)
        numbers = [entry for entry in entries if entry is not None]
        if numbers and self._journal is not None:
            self._journal.committed(numbers[-1])

    def _adopt(self) -> None:
        assert self._journal is not None
        adopt(self._journal, _Records(self.store), self._batch_size)

    def _close_journal(self) -> None:
        assert self._journal is not None
        retire(self._journal, _Records(self.store), drained=not self._pending)


class _Records:
    """Audit records' journal sink (``appliance/lib/journal.py``): the chain, with each journal's mark."""

    def __init__(self, store: AuditStore) -> None:
        self._store = store

    def mark(self, journal: str) -> int:
        return self._store.journal_mark(journal)

    def decode(self, payload: bytes) -> AuditEvent:
        return _decoded(payload)

    def write(self, journal: str, entries: list[tuple[int, AuditEvent]]) -> None:
        try:
            self._store.append([event for _, event in entries], journal, [seq for seq, _ in entries])
        except Exception as exc:
            if is_transient(exc):
                raise
            for seq, event in entries:  # isolate the record the database refuses; each commits its own mark
                _append_isolating(self._store, [event], journal, [seq])

    def forget(self, journal: str) -> None:
        self._store.forget_journal(journal)


def _append_isolating(
    store: AuditStore, events: list[AuditEvent], journal: str | None, entries: list[int | None]
) -> list[int]:
    """Append ``events``; a single record the database refuses for its data is replaced by a record saying so."""
    try:
        return store.append(events, journal, entries)
    except Exception as exc:
        if is_transient(exc) or len(events) > 1:
            raise
        log.error("an audit record was refused (%s: %s); it is replaced by a record saying so", type(exc).__name__, exc)
        return store.append([rejected(events[0], exc)], journal, entries)  # raises: retried


def _decoded(payload: bytes) -> AuditEvent:
    """A journaled record; one that does not decode as a record becomes the record saying so (with what of it can
    be read), in its place in the chain."""
    try:
        return msgspec.json.decode(payload, type=AuditEvent)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            raw = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            raw = {}
        values = raw if isinstance(raw, dict) else {}
        unread = AuditEvent(event_type=str(values.get("event_type") or "unknown"), outcome="failure")
        for name in ("subject", "subject_kind", "tenant_id", "source_ip", "request_id", "outcome"):
            if isinstance(values.get(name), str):
                setattr(unread, name, values[name])
        return rejected(unread, exc)


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

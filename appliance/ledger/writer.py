"""Usage records written off the hot path, through a bounded queue with back-pressure.

A request takes a *slot* before it is served (:meth:`UsageWriter.acquire`) and hands its record to the
slot when it ends. The slot is freed only once the record is committed, so the queue's capacity bounds
in-flight requests plus unwritten records: when the database falls behind, new requests wait (and, past
``acquire_timeout_s``, are refused with 503) instead of records being dropped. Handing a record over never
awaits, so it is safe in cleanup code that runs while a request is being cancelled.

A process killed after an answer must not lose its row. With a journal (``appliance/lib/journal.py``, the
gateway's case), every row is appended to this process's journal when it is handed over, and committed in group
commits every ``flush_interval_s`` (or once ``batch_size`` rows wait), off the answer's path; each batch commits
its last journal number with it, and a dead process's journal is written past that mark by the next writer that
finds it. Without a journal (or when the journal's disk refuses a row), a request that is answered waits for its
row to be committed (:meth:`UsageSlot.submit` with ``durable``, awaited by the settlement with the audit
record), and such rows are written at once, without waiting for ``flush_interval_s``.

Text a client controls (a token's claims, say) is bounded to its column when the record is handed over. A
batch that fails because of the database is retried as it is; one that fails because of its data is split
until the row the database refuses is found, and that row is replaced by one with the same request id and
attribution, its figures clamped, and ``error_code`` ``usage_record_rejected``: the rest are written, and
nothing is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import BigInteger, Table, insert
from sqlalchemy.engine import Engine

from appliance.db.engine import writing
from appliance.db.faults import is_transient
from appliance.db.marks import drop_mark, mark_of, set_mark, unmarked
from appliance.ledger.models import UsageRecord
from appliance.lib.barriers import CountBarriers
from appliance.lib.bounded import bounded
from appliance.lib.errors import ServiceUnavailableError
from appliance.lib.journal import Journal, adopt, journaled, retire
from appliance.lib.principal import Principal
from appliance.lib.rows import row_of
from appliance.lib.tasks import acquire_within
from appliance.lib.times import utcnow

log = logging.getLogger(__name__)


@dataclass(slots=True)
class UsageEvent:
    request_id: str
    model: str
    endpoint: str
    status_code: int
    engine: str | None = None
    tenant_id: str | None = None
    workflow_id: str | None = None
    agent_id: str | None = None
    api_key_id: str | None = None
    subject: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    error_code: str | None = None
    budget_id: str | None = None
    cost_micros: int = 0
    retry_attempt: int = 0
    depth: int = 0
    streamed: bool = False
    client_disconnected: bool = False
    embed_ms: float | None = None
    search_ms: float | None = None
    chunks_injected: int = 0
    injected_tokens: int = 0
    retrieval_cached: bool = False
    finish_reason: str | None = None
    context_length: int | None = None
    created_at: datetime = field(default_factory=utcnow)

    @classmethod
    def attributed(cls, principal: Principal, request_id: str, endpoint: str, model: str, **fields: Any) -> UsageEvent:
        """A request's row, not settled yet, attributed to its principal's tenant, workflow, agent, key and subject."""
        return cls(
            request_id=request_id,
            model=model,
            endpoint=endpoint,
            status_code=0,
            tenant_id=principal.tenant_id,
            workflow_id=principal.workflow_id,
            agent_id=principal.agent_id,
            api_key_id=principal.api_key_id,
            subject=principal.subject,
            **fields,
        )


@dataclass(frozen=True, slots=True)
class RetrievalStats:
    """What retrieval cost a grounded request (its latency floor and its token inflation)."""

    embed_ms: float | None = None
    search_ms: float | None = None
    chunks_injected: int = 0
    injected_tokens: int = 0
    cached: bool = False

    def apply(self, event: UsageEvent) -> None:
        event.embed_ms, event.search_ms = self.embed_ms, self.search_ms
        event.chunks_injected, event.injected_tokens = self.chunks_injected, self.injected_tokens
        event.retrieval_cached = self.cached


class UsageSlot:
    """One request's place in the queue; :meth:`submit` exactly once, or :meth:`release` to give it back."""

    __slots__ = ("_done", "_writer")

    def __init__(self, writer: UsageWriter) -> None:
        self._writer = writer
        self._done = False

    def submit(self, event: UsageEvent, *, durable: bool = False) -> asyncio.Future[None] | None:
        """Hand the row over; with ``durable``, a future done once it is committed (None when there is nothing to
        wait for: submitted already, or a writer that is not running, as in tests that build a settlement alone)."""
        if self._done:
            return None
        self._done = True
        return self._writer._enqueue(event, durable)

    async def committed(self, future: asyncio.Future[None] | None) -> None:
        """Wait for the row :meth:`submit` handed over with ``durable`` to be committed (503 past a timeout)."""
        await self._writer.committed(future)

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._writer._slots.release()


class UsageWriter:
    def __init__(
        self,
        engine: Engine,
        *,
        capacity: int,
        batch_size: int = 500,
        flush_interval_s: float = 0.2,
        acquire_timeout_s: float = 10.0,
        journal: Journal | None = None,
        adopt_interval_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._slots = asyncio.Semaphore(capacity)
        self._pending: deque[UsageEvent] = deque()
        self._committed: deque[asyncio.Future[None] | None] = deque()  # one per pending row: who waits for it
        self._seqs: deque[int | None] = deque()  # one per pending row: its journal entry, if journaled
        self._journal = journal
        self._adopt_interval_s = adopt_interval_s
        self._flushes = CountBarriers()  # who waits for every row handed over by then to be written
        self._wakeup = asyncio.Event()
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._acquire_timeout_s = acquire_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failing = False  # the last write failed: rows wait in the queue for the database
        self.written = 0

    async def start(self) -> None:
        if self._journal is not None:
            await asyncio.to_thread(self._journal.open)
            await asyncio.to_thread(self._adopt)
        self._task = asyncio.create_task(self._run(), name="usage-writer")

    async def stop(self) -> None:
        """Write everything still pending (and what dead processes' journals hold), then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._journal is not None:
            await asyncio.to_thread(self._adopt)
            await asyncio.to_thread(self._close_journal)

    async def acquire(self) -> UsageSlot:
        if not await acquire_within(self._slots, self._acquire_timeout_s):
            raise ServiceUnavailableError(
                "The usage ledger is not keeping up; the request was not served.", code="ledger_backlog"
            )
        return UsageSlot(self)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        """Return once every row handed over so far is committed (a report read after a request sees it: rows
        are journaled, and committed in groups after the answer). Fails closed: 503."""
        if not self._pending or self._task is None:
            return
        future = self._flushes.at(self.written + len(self._pending))
        self._wakeup.set()
        await self.committed(future)

    def check_accepting(self) -> None:
        """Refuse (503) while rows cannot be written (the last write failed and is being retried, or the journal's
        disk is full): a request is refused before it reaches an engine, not after."""
        if self._failing or (self._journal is not None and not self._journal.accepting()):
            raise ServiceUnavailableError("The usage ledger is not accepting records.", code="ledger_unavailable")

    async def committed(self, future: asyncio.Future[None] | None) -> None:
        """Wait for a row handed over with ``durable`` to be committed. Fails closed: 503."""
        if future is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(future), self._acquire_timeout_s)
        except TimeoutError:
            raise ServiceUnavailableError(
                "The usage ledger is not accepting records.", code="ledger_unavailable"
            ) from None

    def _enqueue(self, event: UsageEvent, durable: bool = False) -> asyncio.Future[None] | None:
        for name, limit in _TEXT_LIMITS.items():
            value = getattr(event, name)
            if value is not None:
                setattr(event, name, bounded(value if isinstance(value, str) else str(value), limit))
        seq = journaled(self._journal, event)
        future: asyncio.Future[None] | None = None
        if durable and self._task is not None:
            if seq is None:
                future = asyncio.get_running_loop().create_future()  # no journal: the answer waits for the commit
            elif self._journal is not None and self._journal.syncs:
                future = asyncio.ensure_future(self._journal.durable(seq))
        self._pending.append(event)
        self._committed.append(future if seq is None else None)
        self._seqs.append(seq)
        if (future is not None and seq is None) or len(self._pending) >= self._batch_size:
            self._wakeup.set()  # someone waits for its commit: written now, with whatever else is pending
        return future

    async def _run(self) -> None:
        backoff = 0.1
        adopted = time.monotonic()
        while True:
            if self._journal is not None and time.monotonic() - adopted >= self._adopt_interval_s:
                adopted = time.monotonic()
                await asyncio.to_thread(self._adopt)
            if not self._pending:
                if self._stopping:
                    return
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
                except TimeoutError:
                    pass
                self._wakeup.clear()
                continue
            count = min(self._batch_size, len(self._pending))
            batch = [self._pending[i] for i in range(count)]
            seqs = [self._seqs[i] for i in range(count)]
            try:
                await self._write_isolating(batch, seqs)
            except Exception:
                if not self._failing:
                    log.exception("writing %d usage records failed; retrying, and refusing new work", len(batch))
                self._failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if self._failing:
                log.warning("the usage ledger accepts records again")
            self._failing = False
            backoff = 0.1

    async def _write_isolating(self, batch: list[UsageEvent], seqs: list[int | None]) -> None:
        """Write ``batch`` (the head of the queue; ``seqs``: their journal entries), isolating a row the database
        refuses. What is committed leaves the queue at once, so a failure part-way (raised to be retried) never
        writes a row twice; nor does a retry of a commit that did land (the journal's mark says so)."""
        journal = self._journal.name if self._journal is not None else None
        try:
            await asyncio.to_thread(_commit_rows, self._engine, batch, journal, seqs)
        except Exception as exc:
            if is_transient(exc) or len(batch) == 1:
                raise
            middle = len(batch) // 2
            await self._write_isolating(batch[:middle], seqs[:middle])
            await self._write_isolating(batch[middle:], seqs[middle:])
            return
        for _ in batch:
            self._pending.popleft()
            self._seqs.popleft()
            future = self._committed.popleft()
            if future is not None and not future.done():
                future.set_result(None)
            self._slots.release()
        self.written += len(batch)
        self._flushes.reached(self.written)
        mark = _last(seqs)
        if mark is not None and self._journal is not None:
            self._journal.committed(mark)

    def _adopt(self) -> None:
        assert self._journal is not None
        adopt(self._journal, _Rows(self._engine), self._batch_size)

    def _close_journal(self) -> None:
        assert self._journal is not None
        retire(self._journal, _Rows(self._engine), drained=not self._pending)


class _Rows:
    """Usage rows' journal sink (``appliance/lib/journal.py``): the ledger, with each journal's mark."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def mark(self, journal: str) -> int:
        with self._engine.connect() as connection:
            return mark_of(connection, journal)

    def decode(self, payload: bytes) -> UsageEvent:
        return _decoded(payload)

    def write(self, journal: str, entries: list[tuple[int, UsageEvent]]) -> None:
        try:
            _write(self._engine, [event for _, event in entries], journal, [seq for seq, _ in entries])
        except Exception as exc:
            if is_transient(exc):
                raise
            for seq, event in entries:  # isolate the row the database refuses; each row commits its own mark
                _commit_rows(self._engine, [event], journal, [seq])

    def forget(self, journal: str) -> None:
        with writing(self._engine) as connection:
            drop_mark(connection, journal)


def _last(seqs: list[int | None]) -> int | None:
    numbers = [seq for seq in seqs if seq is not None]
    return numbers[-1] if numbers else None


def _write(engine: Engine, batch: list[UsageEvent], journal: str | None, seqs: list[int | None]) -> None:
    """Insert the rows of ``batch`` not yet committed (by ``journal``'s mark), and the new mark, in one transaction."""
    with writing(engine) as connection:
        keep, mark = unmarked(connection, journal, seqs)
        rows = [row_of(event) for event, kept in zip(batch, keep, strict=True) if kept]
        if rows:
            connection.execute(insert(UsageRecord), rows)
        if journal is not None and mark is not None:
            set_mark(connection, journal, mark)


def _commit_rows(engine: Engine, batch: list[UsageEvent], journal: str | None, seqs: list[int | None]) -> None:
    """Write ``batch``; a single row the database refuses for its data is replaced by a row saying so."""
    try:
        _write(engine, batch, journal, seqs)
        return
    except Exception as exc:
        if is_transient(exc) or len(batch) > 1:
            raise
        log.error("a usage row was refused (%s): %.2000r; it is replaced by a row saying so", exc, batch[0])
    replacement = rejected(batch[0])
    try:
        _write(engine, [replacement], journal, seqs)
    except Exception as again:  # its request id is taken (a duplicate): keep both, told apart
        if is_transient(again):
            raise
        replacement.request_id = f"{replacement.request_id[:46]}~dup{uuid.uuid4().hex[:12]}"
        _write(engine, [replacement], journal, seqs)  # raises: retried


def _decoded(payload: bytes) -> UsageEvent:
    """A journaled row; one that does not decode as a row (a value JSON cannot carry, such as NaN) becomes the row
    saying so, with what of it can be read."""
    try:
        return msgspec.json.decode(payload, type=UsageEvent)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error("a journaled usage row does not decode (%s); it is replaced by a row saying so", exc)
        try:
            raw = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            raw = {}
        values = raw if isinstance(raw, dict) else {}
        event = UsageEvent(
            request_id=str(values.get("request_id") or f"req_unreadable_{uuid.uuid4().hex[:12]}"),
            model=str(values.get("model") or ""),
            endpoint=str(values.get("endpoint") or ""),
            status_code=0,
        )
        for name in UsageEvent.__dataclass_fields__:
            if name in values and name != "created_at":
                setattr(event, name, values[name])
        return rejected(event)


_TABLE: Table = UsageRecord.__table__  # type: ignore[attr-defined]
_TEXT_LIMITS = {
    column.name: int(column.type.length)  # type: ignore[attr-defined]
    for column in _TABLE.columns
    if column.name in UsageEvent.__dataclass_fields__ and getattr(column.type, "length", None)
}
_INT_MAX = {
    column.name: 2**63 - 1 if isinstance(column.type, BigInteger) else 2**31 - 1
    for column in _TABLE.columns
    if column.name in UsageEvent.__dataclass_fields__ and column.type.python_type is int
}


def rejected(event: UsageEvent) -> UsageEvent:
    """The row that takes the place of one the database refused: its request id and attribution as text that
    fits, its figures clamped to what the columns hold, and ``error_code`` saying so."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(UsageEvent):
        value, default = getattr(event, item.name), item.default
        if item.name in _TEXT_LIMITS:
            value = bounded(str(value), _TEXT_LIMITS[item.name]) if value is not None else None
        elif item.name in _INT_MAX:
            value = min(max(int(value), 0), _INT_MAX[item.name]) if isinstance(value, int | float) else 0
        elif isinstance(default, float) and not (isinstance(value, int | float) and math.isfinite(value)):
            value = default  # a figure that is required: its default where it is missing or not finite
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(default, bool):
            value = bool(value)
        elif item.name == "created_at" and not isinstance(value, datetime):
            value = utcnow()
        values[item.name] = value
    values["error_code"] = "usage_record_rejected"
    return UsageEvent(**values)

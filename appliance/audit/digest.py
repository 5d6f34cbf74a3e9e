"""Refusals of unauthenticated requests, recorded without letting a flood of them write the audit log.

Every refusal of a request that names nobody (a 401, a sign-in refused by its rate limit) gets an audit record,
but one record per request lets anyone, without a credential, make the appliance hash, chain and store a record
for each request they send: thousands a second, the audit volume filling at megabytes a second, the writer's
thread taking the interpreter from the requests of other tenants. So within each window of ``window_s`` seconds:

- the first ``per_source`` refusals of a kind (event type and reason) from one address are recorded one by one,
  the request answered once its record is durable, as before; and so are the first ``overall`` refusals of all
  addresses together;
- the others are counted, per kind and address, and answered at once; when the window ends one summary record
  per kind and address says how many were refused and when (``detail.summarised``), so the log still accounts
  for every refusal. At most ``max_sources`` kinds and addresses are counted apart; the rest are summed in one
  summary with ``source_ip`` empty and the number of addresses they came from.

With a journal (``appliance/lib/journal.py``, the gateway's case), each counted refusal is also appended to this
process's ``refusals`` journal before it is answered, and a window's summaries are committed together with that
journal's mark: a process killed before its window ended (``kill -9``, the OOM killer) loses no count. The next
process that finds its journal (at its start, and every ``adopt_interval_s``) summarises what lies past the mark,
in the same records. While the database does not take a window's summaries, the next window goes on until it does
(one window's counts in memory); the journal takes at most ``_UNCOMMITTED`` entries the database has not, and none
while its volume is full (the volume is the audit and usage journals' too): past those, and without a journal, the
counts of a window not yet summarised are lost if the process dies (at most ``window_s`` seconds of them). They are
written when it stops, or left in the journal for the next process if the database is down then."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import msgspec

from appliance.audit.store import AuditEvent, AuditStore
from appliance.audit.writer import AuditWriter, rejected
from appliance.db.faults import is_transient
from appliance.lib.journal import Journal, adopt, journaled, retire

log = logging.getLogger(__name__)
T = TypeVar("T")
_OTHERS = ("", "")  # the key of what is counted once the table is full
_ADOPT_BATCH = 10_000  # a dead process's counted refusals read at a time (one set of summaries each)
_FIRST_BACKOFF = 0.05  # s: the first wait before a commit the database refused is tried again
_UNCOMMITTED = 200_000  # counted refusals journaled and not committed at most (~100 MB: a database outage)


@dataclass
class _Counted:
    event: AuditEvent  # the first refusal counted: its kind, address and user agent head the summary
    first: datetime  # the earliest and latest refusal counted here
    last: datetime
    count: int = 0
    sources: set[str] = field(default_factory=set)  # only for the summary of the others
    upto: int | None = None  # the journal entry of the last refusal counted here (None: not journaled)


class _Window:
    """What one window counted: per kind and address, at most ``max_sources`` of them apart, the rest together."""

    def __init__(self, max_sources: int) -> None:
        self._max_sources = max_sources
        self.counted: dict[tuple[str, str], _Counted] = {}

    def count(self, key: tuple[str, str], event: AuditEvent, entry: int | None) -> None:
        counted = self.counted.get(key)
        if counted is None:
            if len(self.counted) >= self._max_sources:
                key = _OTHERS
                counted = self.counted.get(key)
            if counted is None:
                counted = self.counted[key] = _Counted(event, event.ts, event.ts)
        counted.count += 1
        counted.first, counted.last = min(counted.first, event.ts), max(counted.last, event.ts)
        if entry is not None:
            counted.upto = entry if counted.upto is None else max(counted.upto, entry)
        if key == _OTHERS and len(counted.sources) < 65_536:
            counted.sources.add(event.source_ip or "")

    def summaries(self) -> list[tuple[AuditEvent, int | None]]:
        """One record per kind and address, each with the journal entry of the last refusal it accounts for."""
        made = []
        for key, counted in self.counted.items():
            first = counted.event
            detail = {
                **first.detail,
                "summarised": counted.count,
                "first": counted.first.isoformat(),
                "last": counted.last.isoformat(),
            }
            if key == _OTHERS:
                detail["sources"] = len(counted.sources)
            summary = AuditEvent(
                event_type=first.event_type,
                outcome=first.outcome,
                component=first.component,
                object_type=first.object_type,
                source_ip=None if key == _OTHERS else first.source_ip,
                user_agent=first.user_agent,
                detail=detail,
            )
            made.append((summary, counted.upto))
        return made


def _key(event: AuditEvent) -> tuple[str, str]:
    return f"{event.event_type}:{event.detail.get('reason', event.detail.get('status', ''))}", event.source_ip or ""


class RefusalDigest:
    def __init__(
        self,
        writer: AuditWriter,
        *,
        window_s: float = 10.0,
        per_source: int = 5,
        overall: int = 100,
        max_sources: int = 1000,
        journal: Journal | None = None,
        adopt_interval_s: float = 5.0,
    ) -> None:
        self._writer = writer
        self._window_s = window_s
        self._per_source = per_source
        self._overall = overall
        self._max_sources = max_sources
        self._journal = journal
        self._adopt_interval_s = adopt_interval_s
        self._recorded: dict[tuple[str, str], int] = {}  # recorded one by one in this window, per kind and address
        self._recorded_overall = 0
        self._counted = _Window(max_sources)
        self._window: asyncio.TimerHandle | None = None
        self._unwritten: list[tuple[AuditEvent, int]] = []  # journaled windows' summaries, not committed
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = False  # after stop(): each refusal is recorded one by one
        self._committed = 0  # how far the journal's entries are committed

    async def start(self) -> None:
        """With a journal: open it, summarise dead processes' journals, and write windows' summaries from now."""
        if self._journal is None:
            return
        await asyncio.to_thread(self._journal.open)
        await asyncio.to_thread(self._adopt)
        self._task = asyncio.create_task(self._run(), name="refusal-digest")

    async def stop(self) -> None:
        """End the window and write its summaries (with a journal: committed, or left in the journal for the next
        process if the database does not take them now). A refusal after this is recorded one by one. Never
        raises: what stops after it (the audit writer) must stop too."""
        try:
            self.summarise(force=True)
            if self._task is None:
                return
            self._stopping = True
            self._wakeup.set()
            await self._task  # its last try at what is unwritten
            self._task = None
            self._stopped = True  # (no await since the task ended: nothing was counted in between)
            self.summarise(force=True)  # what was counted while the last commit ran
            if self._unwritten:
                with contextlib.suppress(Exception):  # logged; left in the journal for the next process
                    await self._write(list(self._unwritten))
            assert self._journal is not None
            await asyncio.to_thread(retire, self._journal, _Summaries(self._writer.store), drained=not self._unwritten)
        except Exception:
            log.exception("the refusal digest did not stop cleanly; what it counted is left in its journal")
        finally:
            self._stopped = True
            if self._window is not None:
                self._window.cancel()
                self._window = None

    async def written(self, timeout_s: float = 10.0) -> None:
        """Return once the journaled summaries of every window ended so far are committed (for tests and readers);
        :class:`TimeoutError` if they are not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self._unwritten:
            if time.monotonic() >= deadline or self._task is None or self._task.done():
                raise TimeoutError(f"{len(self._unwritten)} summaries of counted refusals are not written")
            self._wakeup.set()
            await asyncio.sleep(0.01)

    async def refused(self, event: AuditEvent) -> None:
        """Account for the refusal ``event``: returns once its record is durable, or at once if it is counted (once
        its count is in the journal, with one; and on the disk, with the journal's ``fsync``)."""
        if self._stopped:
            await self._writer.record(event)
            return
        if self._window is None:
            self._window = asyncio.get_running_loop().call_later(self._window_s, self.summarise)
        key = _key(event)
        recorded = self._recorded.get(key, 0)
        if recorded < self._per_source and self._recorded_overall < self._overall:
            if recorded == 0 and len(self._recorded) >= self._max_sources:
                await self._count(key, event)
                return
            self._recorded[key] = recorded + 1
            self._recorded_overall += 1
            await self._writer.record(event)
            return
        await self._count(key, event)

    def summarise(self, *, force: bool = False) -> None:
        """End the window: one summary record per kind and address counted in it (also when the process stops).
        While the last window's summaries wait for the database (journaled, not committed yet), the window goes on
        instead, unless ``force``: what waits in memory is one window's, whatever the outage's length."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if self._unwritten and not force:
            self._window = asyncio.get_running_loop().call_later(self._window_s, self.summarise)
            return
        counted, self._counted = self._counted, _Window(self._max_sources)
        self._recorded.clear()
        self._recorded_overall = 0
        for summary, upto in counted.summaries():
            if upto is None:  # not journaled: the audit writer's own journal makes it durable
                self._writer.record_nowait(summary)
            else:
                self._unwritten.append((summary, upto))
        if self._unwritten:
            self._wakeup.set()

    async def _count(self, key: tuple[str, str], event: AuditEvent) -> None:
        """Count ``event``, journaled first where the journal takes it: not while its volume is full, nor past
        ``_UNCOMMITTED`` entries the database has not taken (an outage: the volume is the audit and usage
        journals' too). Counted without it, a refusal is in memory only until its window's end, as without a
        journal."""
        journal, entry = self._journal, None
        if journal is not None and journal.accepting() and journal.appended - self._committed < _UNCOMMITTED:
            entry = journaled(journal, event)
        self._counted.count(key, event, entry)
        if entry is not None and journal is not None and journal.syncs:
            await journal.durable(entry)

    async def _run(self) -> None:
        """Commit windows' summaries with the journal's mark (retried while the database refuses), and summarise
        dead processes' journals every ``adopt_interval_s``."""
        loop = asyncio.get_running_loop()
        adopted = loop.time()
        backoff = _FIRST_BACKOFF
        while True:
            if loop.time() - adopted >= self._adopt_interval_s:
                adopted = loop.time()
                await asyncio.to_thread(self._adopt)
            if self._unwritten:
                try:
                    await self._write(list(self._unwritten))
                except Exception as exc:
                    if backoff == _FIRST_BACKOFF:  # once per outage, not at every try
                        log.warning("the summaries of counted refusals wait for the database (%s)", exc)
                    if self._stopping:
                        return  # left in the journal: the next process summarises them
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                if backoff != _FIRST_BACKOFF:
                    log.warning("the summaries of counted refusals are written again")
                backoff = _FIRST_BACKOFF
                continue
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self._adopt_interval_s)
            self._wakeup.clear()

    async def _write(self, batch: list[tuple[AuditEvent, int]]) -> None:
        """Commit ``batch`` (the head of what is unwritten) with the journal's mark (:func:`_commit`), then let the
        journal go of what it covers; a database that cannot take it now raises, and the batch is tried again
        whole."""
        journal = self._journal
        assert journal is not None
        entries = [(upto, summary) for summary, upto in batch]  # each summary under its last refusal's entry
        await asyncio.to_thread(_commit, self._writer.store, journal.name, entries, _as_made)
        top = max(upto for upto, _ in entries)
        journal.committed(top)  # (on the loop, as every use of the journal)
        self._committed = max(self._committed, top)
        del self._unwritten[: len(batch)]

    def _adopt(self) -> None:
        assert self._journal is not None
        adopt(self._journal, _Summaries(self._writer.store, self._max_sources), batch_size=_ADOPT_BATCH)


def _commit(
    store: AuditStore,
    journal: str,
    entries: list[tuple[int, T]],
    make: Callable[[list[tuple[int, T]]], list[AuditEvent]],
) -> None:
    """Commit the summaries ``make`` draws from ``entries`` (journal number, entry) with ``journal``'s mark
    (:meth:`AuditStore.append_made_of`); ones the database refuses for their data are replaced by the records saying
    so, with their counts, so that no journal is tried again for ever. Raises what the database cannot take now."""
    try:
        store.append_made_of(journal, entries, make)
    except Exception as exc:
        if is_transient(exc):
            raise
        log.error("summaries of counted refusals were refused (%s: %s); recorded as refused", type(exc).__name__, exc)
        refused = exc  # (the name ``exc`` ends with its except clause)
        store.append_made_of(
            journal, entries, lambda new: [_refused_summary(summary, refused) for summary in make(new)]
        )


def _as_made(entries: list[tuple[int, AuditEvent]]) -> list[AuditEvent]:
    """The live process's summaries, made already: each under its journal number."""
    return [summary for _, summary in entries]


def _refused_summary(summary: AuditEvent, exc: BaseException) -> AuditEvent:
    """The record in place of a summary the database refused, with how many refusals it accounted for."""
    record = rejected(summary, exc)
    record.detail = {**record.detail, "summarised": summary.detail.get("summarised")}
    return record


class _Summaries:
    """The ``refusals`` journals' sink (``appliance/lib/journal.py``): a dead process's counted refusals, summarised
    per kind and address as its window would have been, committed with its journal's mark."""

    def __init__(self, store: AuditStore, max_sources: int = 1000) -> None:
        self._store = store
        self._max_sources = max_sources

    def mark(self, journal: str) -> int:
        return self._store.journal_mark(journal)

    def decode(self, payload: bytes) -> AuditEvent | None:
        try:
            return msgspec.json.decode(payload, type=AuditEvent)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.error("a counted refusal in a journal does not decode; it is summarised as unreadable")
            return None

    def write(self, journal: str, entries: list[tuple[int, AuditEvent | None]]) -> None:
        _commit(self._store, journal, entries, self._summarised)

    def _summarised(self, entries: list[tuple[int, AuditEvent | None]]) -> list[AuditEvent]:
        window = _Window(self._max_sources)
        for seq, event in entries:
            if event is None:
                event = AuditEvent(event_type="access.refused", outcome="denied", detail={"reason": "unreadable"})
            window.count(_key(event), event, seq)
        return [summary for summary, _ in window.summaries()]

    def forget(self, journal: str) -> None:
        self._store.forget_journal(journal)

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

The counts of a window not yet summarised are lost if the process dies (at most ``window_s`` seconds of them);
they are written when the process stops."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

from appliance.audit.store import AuditEvent
from appliance.audit.writer import AuditWriter

_OTHERS = ("", "")  # the key of what is counted once the table is full


@dataclass
class _Counted:
    event: AuditEvent  # the first refusal counted: its kind, address and user agent head the summary
    count: int = 0
    first: datetime = field(default_factory=lambda: datetime.now(UTC))
    last: datetime = field(default_factory=lambda: datetime.now(UTC))
    sources: set[str] = field(default_factory=set)  # only for the summary of the others


class RefusalDigest:
    def __init__(
        self,
        writer: AuditWriter,
        *,
        window_s: float = 10.0,
        per_source: int = 5,
        overall: int = 100,
        max_sources: int = 1000,
    ) -> None:
        self._writer = writer
        self._window_s = window_s
        self._per_source = per_source
        self._overall = overall
        self._max_sources = max_sources
        self._recorded: dict[tuple[str, str], int] = {}  # recorded one by one in this window, per kind and address
        self._recorded_overall = 0
        self._counted: dict[tuple[str, str], _Counted] = {}
        self._window: asyncio.TimerHandle | None = None

    async def refused(self, event: AuditEvent) -> None:
        """Account for the refusal ``event``: returns once its record is durable, or at once if it is counted."""
        if self._window is None:
            self._window = asyncio.get_running_loop().call_later(self._window_s, self.summarise)
        kind = f"{event.event_type}:{event.detail.get('reason', event.detail.get('status', ''))}"
        key = (kind, event.source_ip or "")
        recorded = self._recorded.get(key, 0)
        if recorded < self._per_source and self._recorded_overall < self._overall:
            if recorded == 0 and len(self._recorded) >= self._max_sources:
                self._count(key, event)
                return
            self._recorded[key] = recorded + 1
            self._recorded_overall += 1
            await self._writer.record(event)
            return
        self._count(key, event)

    def summarise(self) -> None:
        """End the window: one summary record per kind and address counted in it (also when the process stops)."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        counted, self._counted = self._counted, {}
        self._recorded.clear()
        self._recorded_overall = 0
        for key, entry in counted.items():
            detail = {
                **entry.event.detail,
                "summarised": entry.count,
                "first": entry.first.isoformat(),
                "last": entry.last.isoformat(),
            }
            if key == _OTHERS:
                detail["sources"] = len(entry.sources)
            self._writer.record_nowait(
                AuditEvent(
                    event_type=entry.event.event_type,
                    outcome=entry.event.outcome,
                    component=entry.event.component,
                    object_type=entry.event.object_type,
                    source_ip=None if key == _OTHERS else entry.event.source_ip,
                    user_agent=entry.event.user_agent,
                    detail=detail,
                )
            )

    def _count(self, key: tuple[str, str], event: AuditEvent) -> None:
        entry = self._counted.get(key)
        if entry is None:
            if len(self._counted) >= self._max_sources:
                key = _OTHERS
                entry = self._counted.get(key)
            if entry is None:
                entry = self._counted[key] = _Counted(event)
        entry.count += 1
        entry.last = datetime.now(UTC)
        if key == _OTHERS and len(entry.sources) < 65_536:
            entry.sources.add(event.source_ip or "")

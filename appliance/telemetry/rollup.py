"""Per-minute roll-ups of each engine's telemetry, written to the database when the minute is over.

The in-memory window answers "how is it now"; the roll-ups answer "how was it" for the console's charts
(requests running and waiting, KV-cache usage, preemptions, tokens, gateway-measured TTFT P50/P99, and the
worst health state of the minute). Each gateway process writes its own rows (``gateway`` is host:pid).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from appliance.lib.stats import nearest_rank
from appliance.telemetry.models import EngineRollup
from appliance.telemetry.samples import EngineSample
from appliance.telemetry.signal import LEVELS

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def gateway_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _Minute:
    start: datetime
    model: str
    samples: list[EngineSample] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    state: str = LEVELS[0]
    before: EngineSample | None = None  # the last sample of the minute before: counters are deltas from it
    gpu_readings: list[float] = field(default_factory=list)

    @property
    def gpu_utilization(self) -> float | None:
        return sum(self.gpu_readings) / len(self.gpu_readings) if self.gpu_readings else None


def _delta(after: float, before: float) -> int:
    """A counter's increase; a counter that went down was reset (the engine restarted): all of it is new."""
    return int(after - before) if after >= before else int(after)


class Rollups:
    def __init__(
        self,
        engine: Engine | None,
        gateway: str,
        retention_days: int,
        wall: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self.gateway = gateway
        self._retention = timedelta(days=retention_days)
        self._wall = wall
        self._minutes: dict[str, _Minute] = {}
        self._pending_ttfts: dict[str, list[float]] = {}
        self._pending_requests: dict[str, list[int]] = {}  # engine -> [requests, server errors]
        self._last_prune: datetime | None = None

    def add(self, engine: str, model: str, sample: EngineSample, state: str) -> EngineRollup | None:
        """Count a sample (and the engine's state now); the finished minute's row when a new minute began."""
        start = self._wall().replace(second=0, microsecond=0)
        current = self._minutes.get(engine)
        finished = None
        if current is not None and current.start != start:
            finished = self._row(engine, current)
            current = _Minute(start, model, before=current.samples[-1] if current.samples else current.before)
            self._minutes[engine] = current
        elif current is None:
            current = self._minutes[engine] = _Minute(start, model)
        current.samples.append(sample)
        current.ttfts.extend(self._pending_ttfts.pop(engine, []))
        requests, errors = self._pending_requests.pop(engine, [0, 0])
        current.requests += requests
        current.errors += errors
        if LEVELS.index(state) > LEVELS.index(current.state):
            current.state = state
        return finished

    def observe_gpu(self, utilization: float) -> None:
        """The node's GPU utilisation now (0..1): counted in every engine's current minute."""
        for minute in self._minutes.values():
            minute.gpu_readings.append(utilization)

    def observe_ttft(self, engine: str, seconds: float) -> None:
        self._pending_ttfts.setdefault(engine, []).append(seconds)

    def observe_request(self, engine: str, status_code: int) -> None:
        """A finished request; a 5xx (or no answer at all) counts as an error of the engine's minute."""
        counts = self._pending_requests.setdefault(engine, [0, 0])
        counts[0] += 1
        if status_code >= 500:
            counts[1] += 1

    def _row(self, engine: str, minute: _Minute) -> EngineRollup:
        samples = minute.samples
        count = len(samples)
        last, before = samples[-1], minute.before or samples[0]
        p50 = p99 = None
        if minute.ttfts:
            p50, p99 = (value * 1000.0 for value in nearest_rank(minute.ttfts, 0.5, 0.99))
        return EngineRollup(
            minute=minute.start,
            engine=engine,
            model=minute.model,
            gateway=self.gateway,
            samples=count,
            running_avg=sum(s.running for s in samples) / count,
            running_max=max(s.running for s in samples),
            waiting_avg=sum(s.waiting for s in samples) / count,
            waiting_max=max(s.waiting for s in samples),
            kv_cache_usage_avg=sum(s.kv_cache_usage for s in samples) / count,
            kv_cache_usage_max=max(s.kv_cache_usage for s in samples),
            preemptions=_delta(last.preemptions, before.preemptions),
            prompt_tokens=_delta(last.prompt_tokens, before.prompt_tokens),
            generation_tokens=_delta(last.generation_tokens, before.generation_tokens),
            requests=minute.requests,
            errors=minute.errors,
            ttft_count=len(minute.ttfts),
            ttft_p50_ms=p50,
            ttft_p99_ms=p99,
            state=minute.state,
            busy_fraction=sum(1 for s in samples if s.running > 0) / count,
            gpu_utilization=minute.gpu_utilization,
        )

    def write(self, rows: list[EngineRollup]) -> None:
        """Store finished minutes (in a worker thread); prune rows past retention once an hour."""
        if self._engine is None or not rows:
            return
        with Session(self._engine) as session:
            session.add_all(rows)
            now = self._wall()
            if self._last_prune is None or now - self._last_prune > timedelta(hours=1):
                session.execute(delete(EngineRollup).where(col(EngineRollup.minute) < now - self._retention))
                self._last_prune = now
            session.commit()

    def history(
        self, engine: str | None, since: datetime | None, until: datetime | None, limit: int
    ) -> list[dict[str, Any]]:
        if self._engine is None:
            return []
        query = select(EngineRollup)
        if engine is not None:
            query = query.where(EngineRollup.engine == engine)
        if since is not None:
            query = query.where(col(EngineRollup.minute) >= since)
        if until is not None:
            query = query.where(col(EngineRollup.minute) < until)
        query = query.order_by(col(EngineRollup.minute).desc(), col(EngineRollup.engine)).limit(limit)
        with Session(self._engine) as session:
            rows = session.exec(query).all()
        return [row.model_dump(exclude={"id"}) for row in reversed(rows)]

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.db.engine import create_schema, make_engine
from appliance.telemetry.models import EngineRollup
from appliance.telemetry.rollup import Rollups
from appliance.telemetry.samples import EngineSample

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def sample(
    running: float, waiting: float, *, kv: float = 0.1, prompt: float = 0.0, preempt: float = 0.0
) -> EngineSample:
    return EngineSample(
        at=0.0, running=running, waiting=waiting, kv_cache_usage=kv, prompt_tokens=prompt, preemptions=preempt
    )


def test_a_minute_is_rolled_up_when_the_next_begins(tmp_path: Path) -> None:
    now = [T0 + timedelta(seconds=5)]
    rollups = Rollups(None, "gw:1", 30, wall=lambda: now[0])
    assert rollups.add("e", "m", sample(1, 0, prompt=100), "healthy") is None
    rollups.observe_ttft("e", 0.05)
    rollups.observe_ttft("e", 0.5)
    rollups.observe_request("e", 200)
    rollups.observe_request("e", 502)
    rollups.observe_request("e", 429)
    now[0] = T0 + timedelta(seconds=30)
    assert rollups.add("e", "m", sample(3, 4, kv=0.9, prompt=400, preempt=2), "degrading") is None
    now[0] = T0 + timedelta(seconds=61)
    row = rollups.add("e", "m", sample(0, 0, prompt=450, preempt=2), "healthy")
    assert row is not None
    assert (row.minute, row.engine, row.model, row.gateway, row.samples) == (T0, "e", "m", "gw:1", 2)
    assert (row.running_avg, row.running_max, row.waiting_avg, row.waiting_max) == (2.0, 3.0, 2.0, 4.0)
    assert row.kv_cache_usage_max == 0.9 and row.state == "degrading"
    assert (row.prompt_tokens, row.preemptions) == (300, 2)
    assert (row.ttft_count, row.ttft_p50_ms, row.ttft_p99_ms) == (2, 50.0, 500.0)
    assert (row.requests, row.errors) == (3, 1)
    now[0] = T0 + timedelta(seconds=125)
    second = rollups.add("e", "m", sample(0, 0, prompt=20), "healthy")  # the engine restarted: counters reset
    assert second is not None and second.minute == T0 + timedelta(minutes=1)
    assert second.prompt_tokens == 50 and second.ttft_p50_ms is None and second.state == "healthy"


def test_rows_are_written_read_back_oldest_first_and_pruned(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    now = [T0]
    rollups = Rollups(engine, "gw:1", 1, wall=lambda: now[0])
    rows = []
    for minute in range(4):
        for engine_name in ("a", "b"):
            now[0] = T0 + timedelta(minutes=minute, seconds=1)
            row = rollups.add(engine_name, "m", sample(minute, 0), "healthy")
            if row is not None:
                rows.append(row)
    rollups.write(rows)
    history = rollups.history("a", None, None, 10)
    assert [(r["minute"].replace(tzinfo=UTC), r["running_max"]) for r in history] == [
        (T0 + timedelta(minutes=m), float(m)) for m in range(3)
    ]
    assert len(rollups.history(None, T0 + timedelta(minutes=1), None, 10)) == 4
    assert len(rollups.history(None, None, None, 3)) == 3, "the newest rows within the limit"
    later = Rollups(engine, "gw:2", 1, wall=lambda: T0 + timedelta(days=2))
    fresh = EngineRollup(minute=T0 + timedelta(days=2), engine="a", model="m", gateway="gw:2")
    later.write([fresh])
    assert [r["gateway"] for r in later.history(None, None, None, 100)] == ["gw:2"], "rows past retention pruned"

"""The placement report read from a real database: per-minute roll-ups of several gateway processes, rows from
before the busy fraction was recorded, GPU readings, and the usage ledger's request mix."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.ledger.models import UsageRecord
from appliance.placement.history import hourly, traffic
from appliance.placement.service import build_report
from appliance.settings import NodeCost, PricingSettings, Settings
from appliance.telemetry.models import EngineRollup

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def rollup(minute: datetime, engine: str, gateway: str, **values: object) -> EngineRollup:
    base: dict[str, object] = {"model": engine, "samples": 60, "prompt_tokens": 600, "generation_tokens": 400}
    return EngineRollup(minute=minute, engine=engine, gateway=gateway, **{**base, **values})


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


def test_hours_take_the_busiest_engine_and_count_each_minute_once(db) -> None:  # type: ignore[no-untyped-def]
    hour = NOW - timedelta(hours=2)
    with Session(db) as session:
        for minute in range(30):
            at = hour + timedelta(minutes=minute)
            # Two gateway processes scrape the chat engine: the same minute twice.
            session.add(rollup(at, "chat", "gw:1", busy_fraction=0.8, requests=3))
            session.add(rollup(at, "chat", "gw:2", busy_fraction=0.6, requests=2))
            session.add(rollup(at, "embed", "gw:1", busy_fraction=0.1, prompt_tokens=50, generation_tokens=0))
        # A row from before migration 0009: no busy fraction; requests running on average stand in for it.
        session.add(rollup(hour + timedelta(hours=1), "chat", "gw:1", busy_fraction=None, running_avg=3.0))
        session.commit()
    hours, source = hourly(db, NOW - timedelta(days=1), NOW)
    assert source == "engine_busy_fraction"
    first, second = hours
    assert first.utilisation == pytest.approx(0.7)  # mean of the two gateways' views; embed is less busy
    assert (first.prompt_tokens, first.generation_tokens, first.requests) == (30 * 650, 30 * 400, 30 * 5)
    assert second.utilisation == 1.0


def test_gpu_readings_are_the_utilisation_where_present(db) -> None:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        session.add(rollup(NOW - timedelta(minutes=5), "chat", "gw:1", busy_fraction=0.2, gpu_utilization=0.9))
        session.commit()
    hours, source = hourly(db, NOW - timedelta(days=1), NOW)
    assert source == "gpu" and hours[0].utilisation == pytest.approx(0.9)


def test_the_request_mix_and_local_retrieval_come_from_the_ledger(db) -> None:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        for index, (endpoint, tokens, injected) in enumerate(
            [("/v1/chat/completions", 100, 0), ("/v1/chat/completions", 50, 0), ("/v1/rag/chat", 400, 300)]
        ):
            session.add(
                UsageRecord(
                    request_id=f"req_{index}", model="m", endpoint=endpoint, status_code=200, total_tokens=tokens,
                    injected_tokens=injected, chunks_injected=3 if injected else 0, created_at=NOW - timedelta(hours=1),
                )
            )  # fmt: skip
        session.commit()
    mix, retrieval = traffic(db, NOW - timedelta(days=1), NOW)
    assert mix == {
        "/v1/chat/completions": {"requests": 2, "tokens": 150},
        "/v1/rag/chat": {"requests": 1, "tokens": 400},
    }
    assert retrieval == {"requests": 1, "injected_tokens": 300, "chunks": 3}


def test_the_report_prices_the_node_from_its_recorded_costs(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with Session(db) as session:
        for hour in range(24 * 3):
            session.add(rollup(NOW - timedelta(hours=hour + 1), "chat", "gw:1", busy_fraction=0.9))
        session.commit()
    node = NodeCost(hardware_price=26_280, amortisation_months=36)  # 1.0 per hour
    settings = Settings(data_dir=tmp_path, pricing=PricingSettings(node=node, tokens_per_second=100))
    report = build_report(db, settings, now=NOW)
    assert report["verdict"] == "on-prem-provisional" and report["hour_cost"] == pytest.approx(1.0)
    cost = report["windows"]["90d"]["cost"]
    # The node is charged for the 72 hours it was observed, not for the 90 days of the window.
    assert cost["node_cost_hours"] == 72 and cost["node_cost"] == pytest.approx(72.0)
    assert cost["on_prem_per_million"] == pytest.approx(72 * 1.0 / (72 * 1000) * 1e6)


def test_the_cli_prints_the_report(tmp_path: Path) -> None:
    env = {"APPLIANCE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "placement", "report", "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verdict"] == "no-data"

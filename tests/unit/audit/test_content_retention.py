"""Captured prompts and answers do not outlive their retention (the running gateway and `appliance audit prune`
remove them), and go with their tenant; the chain is untouched by either."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent
from appliance.settings import AuditSettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import fake_settings


def captured(request_id: str, tenant_id: str, age_days: float) -> AuditEvent:
    return AuditEvent(
        "inference.completions",
        "success",
        tenant_id=tenant_id,
        request_id=request_id,
        ts=datetime.now(UTC) - timedelta(days=age_days),
        content=("what is my balance", "it is 12 EUR"),
    )


def content_ids(data_dir: Path) -> set[str]:
    connection = sqlite3.connect(data_dir / "appliance.db")
    try:
        return {row[0] for row in connection.execute("SELECT request_id FROM audit_content")}
    finally:
        connection.close()


def test_the_store_prunes_content_past_its_age_and_forgets_a_tenants(tmp_path: Path) -> None:
    store = audit_store(Settings(data_dir=tmp_path))
    store.append([captured("old", "t1", 40), captured("new", "t1", 1), captured("other", "t2", 40)])
    assert store.prune_content(datetime.now(UTC) - timedelta(days=30)) == 2
    assert content_ids(tmp_path) == {"new"}
    store.append([captured("t2-new", "t2", 0)])
    assert store.forget_tenant_content("t1") == 1
    assert content_ids(tmp_path) == {"t2-new"}
    assert store.verify().ok and store.verify().records == 4, "the chained records stay"


def test_appliance_audit_prune_prunes_content_by_its_retention(tmp_path: Path) -> None:
    store = audit_store(Settings(data_dir=tmp_path))
    store.append([captured("old", "t1", 10), captured("new", "t1", 1)])
    env = {
        "APPLIANCE_DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "APPLIANCE_CONFIG": str(tmp_path / "no.toml"),
        "APPLIANCE_AUDIT__CONTENT_RETENTION_DAYS": "7",
    }
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "audit", "prune", "--archive", str(tmp_path / "a.jsonl")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "1 captured" in result.stdout
    assert content_ids(tmp_path) == {"new"}


async def test_the_running_gateway_prunes_captured_content(tmp_path: Path, fake_engine: FakeEngine) -> None:
    settings = fake_settings(tmp_path, fake_engine, audit=AuditSettings(content_retention_days=30))
    audit_store(settings).append([captured("old", "t1", 31), captured("new", "t1", 29)])
    async with AsyncTestClient(app=create_app(settings)):
        for _ in range(100):
            if content_ids(tmp_path) == {"new"}:
                break
            await asyncio.sleep(0.05)
    assert content_ids(tmp_path) == {"new"}

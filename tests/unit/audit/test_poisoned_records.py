"""A record that cannot be written must not stop the audit log (issue #21): what an attacker sends is bounded
before it reaches a record, and a record the database still refuses is isolated and accounted for."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.audit.chain import NoteKey
from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent, AuditStore
from appliance.audit.writer import AuditWriter
from appliance.db.engine import create_schema, make_engine
from appliance.settings import DatabaseSettings, Settings
from tests.support.postgres import PostgresServer


def pg_settings(postgres: PostgresServer, tmp_path: Path) -> Settings:
    url = postgres.create_database(f"audit_{uuid.uuid4().hex[:12]}")
    return Settings(data_dir=tmp_path, database=DatabaseSettings(url=url))


@pytest.mark.timeout(60)
async def test_an_oversized_client_id_at_the_token_endpoint_does_not_stop_the_audit_log(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    settings = pg_settings(postgres, tmp_path)
    huge = "x" * 1_000_000
    async with AsyncTestClient(app=create_app(settings)) as client:
        first = await client.post(
            "/oidc/token", data={"grant_type": "client_credentials", "client_id": huge, "client_secret": "s"}
        )
        assert first.status_code == 401
        # Every later request that needs an audit record is still answered (before: 503 after 10 s, for ever).
        second = await asyncio.wait_for(
            client.post(
                "/oidc/token", data={"grant_type": "client_credentials", "client_id": "cli_x", "client_secret": "s"}
            ),
            timeout=8,
        )
        assert second.status_code == 401
    store = audit_store(settings)
    found = store.search(event_type="auth.token.client_credentials")
    subjects = [row["subject"] for row in found["data"]]
    assert "cli_x" in subjects
    bounded = next(s for s in subjects if s != "cli_x")
    assert len(bounded) <= 300, "the subject fits its column"
    assert bounded.startswith("xxxx") and hashlib.sha256(huge.encode()).hexdigest()[:16] in bounded
    assert store.verify().ok


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AuditStore:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"audit_{uuid.uuid4().hex[:12]}")
    engine = make_engine(url, serialized_writes=True)
    create_schema(engine)
    key = NoteKey.load_or_create(tmp_path / "audit-key", "test-node")
    return AuditStore(engine, key, latest_checkpoint_file=tmp_path / "latest", node="n1")


def ok(n: int) -> AuditEvent:
    return AuditEvent("admin.tenant.create", "success", subject=f"user-{n}", request_id=f"req_{n}")


def poisoned(n: int) -> AuditEvent:
    """A record the database refuses whatever its backend: a detail value that is not JSON (a caller's bug)."""
    return AuditEvent(
        "admin.tenant.create", "success", subject=f"bad-{n}", request_id=f"req_{n}", detail={"x": object()}
    )


@pytest.mark.timeout(30)
async def test_one_unwritable_record_is_replaced_by_a_record_saying_so_and_the_rest_are_written(
    store: AuditStore,
) -> None:
    writer = AuditWriter(store, timeout_s=5)
    await writer.start()
    events = [ok(0), ok(1), poisoned(2), ok(3), ok(4)]
    seqs = await asyncio.wait_for(asyncio.gather(*(writer.record(e) for e in events)), timeout=5)
    later = await asyncio.wait_for(writer.record(ok(5)), timeout=5)
    await writer.stop()
    assert seqs == [1, 2, 3, 4, 5] and later == 6, "every caller is answered, in order"
    rows = {row["seq"]: row for row in store.search(limit=10)["data"]}
    assert [rows[s]["subject"] for s in (1, 2, 4, 5, 6)] == ["user-0", "user-1", "user-3", "user-4", "user-5"]
    rejected = rows[3]
    assert rejected["event_type"] == "audit.record_rejected" and rejected["outcome"] == "failure"
    assert rejected["request_id"] == "req_2"
    assert rejected["detail"]["event_type"] == "admin.tenant.create"
    assert rejected["detail"]["error"] == "TypeError"
    assert store.verify().ok


@pytest.mark.timeout(30)
async def test_an_overlong_field_set_after_the_event_was_made_is_isolated_on_postgresql(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = postgres.create_database(f"audit_{uuid.uuid4().hex[:12]}")
    engine = make_engine(url, serialized_writes=True)
    create_schema(engine)
    store = AuditStore(
        engine, NoteKey.load_or_create(tmp_path / "k", "n"), latest_checkpoint_file=tmp_path / "latest", node="n1"
    )
    writer = AuditWriter(store, timeout_s=5)
    await writer.start()
    bad = ok(1)
    bad.user_agent = "u" * 5000  # past the boundary's check: only the database can refuse it
    seqs = await asyncio.wait_for(asyncio.gather(writer.record(ok(0)), writer.record(bad), writer.record(ok(2))), 5)
    await writer.stop()
    assert seqs == [1, 2, 3]
    rows: dict[int, Any] = {row["seq"]: row for row in store.search(limit=10)["data"]}
    assert rows[2]["event_type"] == "audit.record_rejected" and rows[2]["detail"]["error"] == "DataError"
    assert store.verify().ok

"""Settlements the database refuses are journaled on disk and replayed until they land: never dropped, never
released free. The failures are real ones: a SQLite database locked by another process's exclusive
transaction, a PostgreSQL server stopped."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import event
from sqlmodel import Session

from appliance.budgets.journal import Settlement, SettlementJournal, orphans
from appliance.budgets.models import Budget
from appliance.budgets.store import BudgetStore
from appliance.db.engine import create_schema, make_engine
from appliance.identity.models import Tenant, Workflow
from tests.support.postgres import PostgresServer

CHAIN = {"workflow": "wf_1", "tenant": "ten_1"}


def seeded(url: str) -> None:
    create_schema(make_engine(url))
    with Session(make_engine(url)) as session:
        session.add(Tenant(id="ten_1", name="acme"))
        session.add(Workflow(id="wf_1", tenant_id="ten_1", name="w"))
        session.commit()
        session.add(
            Budget(
                tenant_id="ten_1",
                scope_type="workflow",
                scope_id="wf_1",
                kind="tokens",
                period="day",
                limit=1000,
                created_by="t",
            )
        )
        session.commit()


def gateway_store(url: str, run_dir: Path, *, busy_timeout_ms: int | None = None) -> BudgetStore:
    engine = make_engine(url, serialized_writes=True)
    if busy_timeout_ms is not None:  # after the engine's own pragmas: fail fast on a locked database
        event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute(f"PRAGMA busy_timeout={busy_timeout_ms}"))
    store = BudgetStore(engine, ZoneInfo("UTC"), gateway_id="gw_a", journal=SettlementJournal(run_dir, "gw_a"))
    store.register("host", 1)
    return store


def tokens(store: BudgetStore) -> tuple[Any, Any]:
    [row] = store.status()
    return row["used"], row["reserved"]


@pytest.fixture
def outage_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, stopped and started again by it."""
    server = PostgresServer().start()
    yield server
    server.stop()


def test_a_settlement_refused_by_a_locked_sqlite_database_is_journaled_then_replayed(tmp_path: Path) -> None:
    path = tmp_path / "appliance.db"
    seeded(f"sqlite:///{path}")
    store = gateway_store(f"sqlite:///{path}", tmp_path / "run", busy_timeout_ms=50)
    store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    other_process = sqlite3.connect(path, isolation_level=None)
    other_process.execute("BEGIN EXCLUSIVE")  # holds the write lock: every write of the gateway fails
    store.settle_durably("r1", total_tokens=25)
    assert store.journal is not None and store.journal.pending() == [Settlement("r1", 25, 0, True)]
    assert store.replay(store.journal) == 1, "still locked: the settlement waits"
    other_process.execute("ROLLBACK")
    assert tokens(store) == (0, 50), "while journaled the reservation stays held, not released free"
    assert store.sweep(dead_after_s=30, unowned_ttl_s=0.001) == 0, "its gateway is alive: the sweeper keeps it"
    assert store.replay(store.journal) == 0
    assert tokens(store) == (25, 0) and store.dangling() == 0
    assert not store.journal.path.exists()
    store.journal.append(Settlement("r1", 25, 0, True))  # a replay of what already landed changes nothing
    assert store.replay(store.journal) == 0 and tokens(store) == (25, 0)


def test_a_settlement_during_a_postgresql_outage_is_journaled_then_replayed(
    tmp_path: Path, outage_postgres: PostgresServer
) -> None:
    url = outage_postgres.create_database(f"budgets_{uuid.uuid4().hex[:12]}")
    seeded(url)
    store = gateway_store(url, tmp_path / "run")
    store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    outage_postgres.halt()
    store.settle_durably("r1", total_tokens=30)
    assert store.journal is not None and store.journal.pending() == [Settlement("r1", 30, 0, True)]
    assert store.replay(store.journal) == 1, "the server is down: the settlement waits"
    outage_postgres.resume()
    assert tokens(store) == (0, 50)
    assert store.replay(store.journal) == 0
    assert tokens(store) == (30, 0) and store.dangling() == 0


def test_without_a_journal_a_refused_settlement_raises(tmp_path: Path) -> None:
    path = tmp_path / "appliance.db"
    seeded(f"sqlite:///{path}")
    store = gateway_store(f"sqlite:///{path}", tmp_path / "run", busy_timeout_ms=50)
    store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    store.journal = None
    other_process = sqlite3.connect(path, isolation_level=None)
    other_process.execute("BEGIN EXCLUSIVE")
    with pytest.raises(Exception, match="database is locked"):
        store.settle_durably("r1", total_tokens=25)
    other_process.execute("ROLLBACK")


def test_a_journal_is_adopted_only_once_its_gateway_is_gone(tmp_path: Path) -> None:
    journal = SettlementJournal(tmp_path, "gw_a")
    assert journal.claim(own=True)
    journal.append(Settlement("r1", 5, 7, False))
    assert orphans(tmp_path, "gw_b") == [], "gw_a holds its journal's lock: it is alive"
    SettlementJournal(tmp_path, "gw_starting").path.write_text("")  # its lock is not in place yet
    assert orphans(tmp_path, "gw_b") == [], "a journal is adopted only through its (free) lock file"
    journal.release()  # gw_a stops with a settlement still waiting: the file stays
    [adopted] = orphans(tmp_path, "gw_b")
    assert (adopted.gateway_id, adopted.pending()) == ("gw_a", [Settlement("r1", 5, 7, False)])
    assert orphans(tmp_path, "gw_c") == [], "gw_b holds it now"
    assert adopted.replay(lambda entry: None) == 0
    adopted.release()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["settlements-gw_starting.jsonl"]


def test_a_line_cut_short_by_a_crash_does_not_hide_later_settlements(tmp_path: Path) -> None:
    journal = SettlementJournal(tmp_path, "gw_a")
    journal.append(Settlement("r1", 1, 0, True))
    with journal.path.open("a") as handle:
        handle.write('{"request_id":"r2","total_')  # the process died mid-write
    journal.append(Settlement("r3", 3, 0, True))
    assert [entry.request_id for entry in journal.pending()] == ["r1", "r3"]
    seen: list[str] = []
    assert journal.replay(lambda entry: seen.append(entry.request_id)) == 0
    assert seen == ["r1", "r3"] and journal.pending() == []


def test_replay_stops_at_the_first_failure_and_keeps_the_order(tmp_path: Path) -> None:
    journal = SettlementJournal(tmp_path, "gw_a")
    for n in range(3):
        journal.append(Settlement(f"r{n}", n, 0, True))

    def apply(entry: Settlement) -> None:
        if entry.request_id == "r1":
            raise ConnectionError("database away")

    assert journal.replay(apply) == 2
    assert [entry.request_id for entry in journal.pending()] == ["r1", "r2"]

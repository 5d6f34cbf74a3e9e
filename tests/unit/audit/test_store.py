"""Each kind of tampering with the audit chain is detected, and names the first bad record."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.audit.chain import NoteKey, record_hash
from appliance.audit.store import AuditEvent, AuditStore
from appliance.db.engine import create_schema, make_engine


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}", serialized_writes=True)
    create_schema(engine)
    key = NoteKey.load_or_create(tmp_path / "audit-key", "test-node")
    store = AuditStore(engine, key, latest_checkpoint_file=tmp_path / "latest", checkpoint_every=10, node="n1")
    for batch in range(5):
        store.append([event(batch * 5 + i) for i in range(5)])
        store.settle()  # a checkpoint due is signed in the background: let it be, for checkpoints at known sizes
    return store


def event(n: int, **overrides: object) -> AuditEvent:
    values: dict[str, object] = {
        "event_type": "admin.tenant.create",
        "outcome": "success",
        "subject": f"user-{n}",
        "object_id": f"ten_{n}",
        "detail": {"n": n, "z": "last", "a": "first"},
    }
    values.update(overrides)
    return AuditEvent(**values)  # type: ignore[arg-type]


def db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "audit.db", isolation_level=None)


def test_an_untouched_chain_verifies(store: AuditStore) -> None:
    result = store.verify()
    assert result.ok, result
    assert (result.records, result.first_seq, result.last_seq) == (25, 1, 25)
    assert result.checkpoints >= 2


def test_edited_record(store: AuditStore, tmp_path: Path) -> None:
    db(tmp_path).execute("UPDATE audit_records SET outcome = 'denied' WHERE seq = 7")
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert "altered" in result.reason


def test_edited_record_with_its_hash_recomputed(store: AuditStore, tmp_path: Path) -> None:
    connection = db(tmp_path)
    connection.execute("UPDATE audit_records SET subject = 'someone-else' WHERE seq = 7")
    connection.execute("UPDATE audit_records SET hash = 'f' || substr(hash, 2) WHERE seq = 7")
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 7)


def test_deleted_record(store: AuditStore, tmp_path: Path) -> None:
    db(tmp_path).execute("DELETE FROM audit_records WHERE seq = 12")
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 12)
    assert "missing" in result.reason


def test_reordered_records(store: AuditStore, tmp_path: Path) -> None:
    connection = db(tmp_path)
    columns = (
        "ts, node, component, event_type, outcome, subject, subject_kind, tenant_id, object_type, object_id, "
        "source_ip, user_agent, request_id, detail, prev_hash, hash"
    )
    connection.execute("UPDATE audit_records SET seq = -3 WHERE seq = 3")
    connection.execute("UPDATE audit_records SET seq = 3 WHERE seq = 4")
    connection.execute("UPDATE audit_records SET seq = 4 WHERE seq = -3")
    assert columns  # every column moved with its row
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)


def test_inserted_record(store: AuditStore, tmp_path: Path) -> None:
    """A forged record slipped in after 10, chained correctly to 10 and with a valid hash of its own."""
    connection = db(tmp_path)
    connection.row_factory = sqlite3.Row
    for seq in range(25, 10, -1):
        connection.execute("UPDATE audit_records SET seq = ? WHERE seq = ?", (seq + 1, seq))
    ten = dict(connection.execute("SELECT * FROM audit_records WHERE seq = 10").fetchone())
    forged = {**ten, "seq": 11, "subject": "intruder", "prev_hash": ten["hash"]}
    forged["ts"] = datetime.fromisoformat(ten["ts"])
    forged["detail"] = {"n": 10, "z": "last", "a": "first"}
    forged["hash"] = record_hash({k: v for k, v in forged.items() if k != "hash"})
    forged["detail"] = '{"a":"first","n":10,"z":"last"}'
    forged["ts"] = ten["ts"]
    names = ", ".join(forged)
    connection.execute(
        f"INSERT INTO audit_records ({names}) VALUES ({', '.join('?' * len(forged))})", list(forged.values())
    )
    result = store.verify()
    assert not result.ok and result.first_bad_seq in (11, 12)


def test_truncation_after_the_last_checkpoint(store: AuditStore, tmp_path: Path) -> None:
    db(tmp_path).execute("DELETE FROM audit_records WHERE seq > 21")
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 22)
    assert "truncated" in result.reason


def test_truncation_behind_a_checkpoint_even_with_the_head_rewritten(store: AuditStore, tmp_path: Path) -> None:
    connection = db(tmp_path)
    connection.execute("DELETE FROM audit_records WHERE seq > 14")
    connection.execute("UPDATE audit_head SET seq = 14, hash = (SELECT hash FROM audit_records WHERE seq = 14)")
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 15)


def test_forged_checkpoint_signature(store: AuditStore, tmp_path: Path) -> None:
    connection = db(tmp_path)
    connection.execute("UPDATE audit_checkpoints SET note = replace(note, '\n15\n', '\n16\n') WHERE tree_size = 15")
    assert connection.total_changes == 1
    result = store.verify()
    assert not result.ok and "signature" in result.reason


def test_prune_archives_and_leaves_an_anchor_so_the_rest_verifies(store: AuditStore, tmp_path: Path) -> None:
    db(tmp_path).execute("UPDATE audit_records SET ts = '2000-01-01 00:00:00.000000' WHERE seq <= 13")
    archive = tmp_path / "archive.jsonl"
    assert store.prune(datetime.now(UTC) - timedelta(days=1), archive) == 13
    assert len(archive.read_text().splitlines()) == 13
    result = store.verify()
    assert result.ok, result
    assert (result.first_seq, result.records) == (14, 12)
    store.append([event(99)])
    assert store.verify().ok
    db(tmp_path).execute("DELETE FROM audit_records WHERE seq = 14")  # beyond the anchor: still detected
    assert store.verify().first_bad_seq == 15


def test_time_based_checkpoint_and_search(store: AuditStore) -> None:
    store.checkpoint()
    assert store.verify().checkpoints >= 3
    page = store.search(subject="user-3", limit=10)
    assert page["total"] == 1 and page["data"][0]["object_id"] == "ten_3"
    assert store.search(event_type="admin.tenant.create", limit=5, offset=20)["data"][-1]["seq"] == 1

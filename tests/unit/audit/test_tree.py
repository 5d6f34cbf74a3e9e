"""The Merkle tree over the stored records: its checkpoints and proofs verify with nothing but the verifier key
and an RFC 6962 verifier, it survives pruning, checkpoints signed before it still verify, and tampering that the
chain alone would miss is found."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from appliance.audit import tree
from appliance.audit.chain import NoteKey, leaf_data, open_checkpoint, record_hash, sign_legacy_checkpoint
from appliance.audit.jcs import canonicalize
from appliance.audit.merkle import leaf_hash, tree_hash, verify_consistency, verify_inclusion
from appliance.audit.proofs import check_proof
from appliance.audit.store import CHECKPOINTS, AuditEvent, AuditStore
from appliance.db.engine import create_schema, make_engine
from tests.support.postgres import PostgresServer


def make_store(tmp_path: Path, every: int = 10) -> AuditStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'audit.db'}", serialized_writes=True)
    create_schema(engine)
    key = NoteKey.load_or_create(tmp_path / "audit-key", "audit.example.org/n1")
    return AuditStore(
        engine, key, latest_checkpoint_file=tmp_path / "latest", checkpoint_every=every, node="n1",
        legacy_key_name="n1",
    )  # fmt: skip


def event(n: int) -> AuditEvent:
    detail = {"n": n, "ratio": n / 3, "name": "é\u20ac\U0001f600", "nested": {"b": [1, None, True], "a": "x"}}
    return AuditEvent("admin.tenants.create", "success", subject=f"user-{n}", object_id=f"ten_{n}", detail=detail)


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    store = make_store(tmp_path)
    for batch in range(5):
        store.append([event(batch * 5 + i) for i in range(5)])
        store.settle()  # a checkpoint due is signed in the background: let it be, for checkpoints at known sizes
    return store


def db(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "audit.db", isolation_level=None)


def exported_leaves(store: AuditStore) -> list[bytes]:
    """What an auditor computes from `appliance audit export`: each record less its `hash`, as RFC 8785 JSON."""
    return [canonicalize({k: v for k, v in record.items() if k != "hash"}) for record in store.export()]


def test_checkpoint_root_is_the_rfc6962_root_of_the_exported_records(store: AuditStore) -> None:
    latest = store.latest_checkpoint()
    assert latest is not None
    verifier = NoteKey.from_vkey(latest["vkey"])
    opened = open_checkpoint(verifier, "audit.example.org/n1", latest["note"])
    assert opened is not None and opened.tree_size == latest["tree_size"] >= 20
    leaves = exported_leaves(store)
    assert opened.hash == tree_hash(leaves[: opened.tree_size]).hex()
    assert latest["note"].startswith(f"audit.example.org/n1\n{opened.tree_size}\n")


def test_inclusion_and_consistency_proofs_verify_against_signed_checkpoints(store: AuditStore) -> None:
    first = store.latest_checkpoint()
    assert first is not None
    store.append([event(100 + i) for i in range(7)])
    store.checkpoint()
    second = store.latest_checkpoint()
    assert second is not None and second["tree_size"] == 32
    root = base64.b64decode(second["root_hash"])
    for seq in (1, 7, 16, 31, 32):
        proof = store.prove_inclusion(seq)
        assert proof["tree_size"] == 32 and proof["checkpoint"] == second["note"]
        assert leaf_hash(leaf_data(proof["record"])) == base64.b64decode(proof["leaf_hash"])
        path = [base64.b64decode(h) for h in proof["inclusion_proof"]]
        verify_inclusion(seq - 1, 32, base64.b64decode(proof["leaf_hash"]), path, root)
        assert check_proof(json.loads(json.dumps(proof)), second["vkey"]) is None
    consistency = store.prove_consistency(first["tree_size"])
    path = [base64.b64decode(h) for h in consistency["consistency_proof"]]
    verify_consistency(first["tree_size"], 32, path, base64.b64decode(first["root_hash"]), root)
    assert check_proof(consistency, second["vkey"], first["note"]) is None

    forged = store.prove_inclusion(5)
    forged["record"]["subject"] = "someone-else"
    assert "does not hash" in str(check_proof(forged, second["vkey"]))
    other = NoteKey.load_or_create(Path(str(store._latest_file) + ".other-key"), "audit.example.org/n1")
    assert "not signed" in str(check_proof(store.prove_inclusion(5), other.vkey()))


def test_witness_request_is_old_size_proof_and_checkpoint(store: AuditStore) -> None:
    first = store.latest_checkpoint()
    assert first is not None
    store.append([event(200 + i) for i in range(11)])
    store.checkpoint()
    body = store.witness_request(first["tree_size"])
    head, note = body.split("\n\n", 1)
    old_line, *proof = head.split("\n")
    assert old_line == f"old {first['tree_size']}"
    latest = store.latest_checkpoint()
    assert latest is not None and note == latest["note"]
    verify_consistency(
        first["tree_size"],
        latest["tree_size"],
        [base64.b64decode(h) for h in proof],
        base64.b64decode(first["root_hash"]),
        base64.b64decode(latest["root_hash"]),
    )
    assert store.witness_request(0).startswith("old 0\n\n")


def test_the_tree_grows_from_stored_records_not_on_every_append(tmp_path: Path) -> None:
    store = make_store(tmp_path, every=1000)
    store.append([event(0)])  # the first checkpoint (signed in the background)
    store.settle()
    for n in range(1, 6):
        store.append([event(n)])
    assert db(tmp_path).execute("SELECT size FROM audit_tree").fetchone() == (1,)
    assert store.checkpoint() is not None
    assert db(tmp_path).execute("SELECT size FROM audit_tree").fetchone() == (6,)
    assert store.checkpoint() is None, "no new records: nothing new to sign"
    assert store.verify().ok


def test_a_record_rewritten_with_the_chain_relinked_is_found_by_the_tree(store: AuditStore, tmp_path: Path) -> None:
    """Someone with the database rewrites record 7 and recomputes every later link, the head and the unsigned
    columns: the chain is whole again, but the Merkle tree (signed) no longer matches."""
    connection = db(tmp_path)
    connection.row_factory = sqlite3.Row
    connection.execute("UPDATE audit_records SET subject = 'someone-else' WHERE seq = 7")
    prev = connection.execute("SELECT hash FROM audit_records WHERE seq = 6").fetchone()[0]
    for row in connection.execute("SELECT * FROM audit_records WHERE seq >= 7 ORDER BY seq").fetchall():
        values = dict(row)
        values["prev_hash"], values["detail"] = prev, json.loads(values["detail"])
        values["ts"] = values["ts"][:10] + "T" + values["ts"][11:] + "Z"
        prev = record_hash({k: v for k, v in values.items() if k != "hash"})
        connection.execute(
            "UPDATE audit_records SET prev_hash = ?, hash = ? WHERE seq = ?", (values["prev_hash"], prev, row["seq"])
        )
        connection.execute("UPDATE audit_checkpoints SET head_hash = ? WHERE tree_size = ?", (prev, row["seq"]))
    connection.execute("UPDATE audit_head SET hash = ?", (prev,))
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 7)
    assert "Merkle tree" in result.reason

    # ... and with the tree rebuilt from the rewritten records too, it no longer has the signed roots
    connection.execute("DELETE FROM audit_tree_nodes")
    connection.execute("UPDATE audit_tree SET size = 0")
    with store._engine.begin() as rebuilding:
        tree.grow(rebuilding)
    result = store.verify()
    assert not result.ok and "signed checkpoint" in result.reason


def test_an_altered_tree_node_is_found(store: AuditStore, tmp_path: Path) -> None:
    db(tmp_path).execute("UPDATE audit_tree_nodes SET hash = zeroblob(32) WHERE level = 1 AND idx = 3")
    result = store.verify()
    assert not result.ok and "records 7..8 was altered" in result.reason


def test_a_deleted_tree_node_or_truncated_tree_is_found(store: AuditStore, tmp_path: Path) -> None:
    db(tmp_path).execute("DELETE FROM audit_tree_nodes WHERE level = 2 AND idx = 1")
    result = store.verify()
    assert not result.ok and "level 2" in result.reason


def test_pruned_records_stay_provable_and_the_rest_verifies(store: AuditStore, tmp_path: Path) -> None:
    before = store.prove_inclusion(3)
    [fourteenth] = [record for record in store.export() if record["seq"] == 14]
    assert store.prune(datetime.fromisoformat(fourteenth["ts"]), tmp_path / "archive.jsonl") == 13
    assert store.verify().ok
    after = store.prove_inclusion(3, before["tree_size"])
    assert after["record"] is None and after["leaf_hash"] == before["leaf_hash"]
    assert after["inclusion_proof"] == before["inclusion_proof"]
    archived = json.loads((tmp_path / "archive.jsonl").read_text().splitlines()[2])
    assert leaf_hash(canonicalize({k: v for k, v in archived.items() if k != "hash"})) == base64.b64decode(
        after["leaf_hash"]
    ), "an archived record still proves against the checkpoints"
    store.append([event(99)])
    store.checkpoint()
    assert store.verify().ok


def test_checkpoints_signed_before_the_tree_still_verify(store: AuditStore, tmp_path: Path) -> None:
    """A checkpoint of the old format (the chain's head, a timestamp; key named after the node) verifies; one
    whose head is not the record's is found."""
    head = db(tmp_path).execute("SELECT hash FROM audit_records WHERE seq = 5").fetchone()[0]
    legacy = sign_legacy_checkpoint(store.key.renamed("n1"), 5, head, datetime.now(UTC))
    with store._engine.begin() as connection:
        connection.execute(
            insert(CHECKPOINTS).values(tree_size=5, head_hash=head, created_at=datetime.now(UTC), note=legacy)
        )
    assert store.verify().ok
    forged = sign_legacy_checkpoint(store.key.renamed("n1"), 6, head, datetime.now(UTC))
    with store._engine.begin() as connection:
        connection.execute(
            insert(CHECKPOINTS).values(tree_size=6, head_hash=head, created_at=datetime.now(UTC), note=forged)
        )
    result = store.verify()
    assert (result.ok, result.first_bad_seq) == (False, 6)


def test_a_rollback_behind_the_checkpoint_on_disk_is_found(store: AuditStore, tmp_path: Path) -> None:
    latest = (tmp_path / "latest").read_text()
    store.append([event(300 + i) for i in range(10)])  # checkpoint due: the file on disk moves on
    store.settle()
    assert (tmp_path / "latest").read_text() != latest
    connection = db(tmp_path)
    connection.execute("DELETE FROM audit_records WHERE seq > 25")
    connection.execute("DELETE FROM audit_checkpoints WHERE tree_size > 25")
    connection.execute("DELETE FROM audit_tree_nodes WHERE (idx + 1) * (1 << level) > 25")
    connection.execute("UPDATE audit_tree SET size = 25")
    connection.execute("UPDATE audit_head SET seq = 25, hash = (SELECT hash FROM audit_records WHERE seq = 25)")
    result = store.verify()
    assert not result.ok and "rolled back" in result.reason


def postgres_stores(postgres: PostgresServer, tmp_path: Path, every: int) -> list[AuditStore]:
    """Two gateway processes' audit stores on one new PostgreSQL database, with one signing key."""
    url = postgres.create_database(f"audit_{uuid.uuid4().hex[:12]}")
    key = NoteKey.load_or_create(tmp_path / "audit-key", "audit.example.org/pg")
    stores = []
    for n in range(2):
        engine = make_engine(url, serialized_writes=True)
        create_schema(engine)
        stores.append(
            AuditStore(engine, key, latest_checkpoint_file=tmp_path / "latest", checkpoint_every=every, node=f"gw{n}")
        )
    return stores


def test_on_postgresql_concurrent_checkpoints_grow_one_tree_and_proofs_verify(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Two gateway processes share PostgreSQL: each appends and signs checkpoints; the tree grows once per
    record (its row is locked while it grows) and every checkpoint verifies."""
    stores = postgres_stores(postgres, tmp_path, every=7)

    stores[0].append([event(0)])  # the head row exists (two first appends at once race on its creation)

    def work(store: AuditStore, offset: int) -> None:
        for batch in range(10):
            store.append([event(offset + batch * 3 + i) for i in range(3)])
            store.checkpoint()

    threads = [threading.Thread(target=work, args=(store, 1000 * n)) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.settle()
    stores[0].checkpoint()
    result = stores[0].verify()
    assert result.ok and result.records == 61, result
    latest = stores[1].latest_checkpoint()
    assert latest is not None and latest["tree_size"] == 61
    assert base64.b64decode(latest["root_hash"]) == tree_hash(exported_leaves(stores[0]))
    for seq in (1, 33, 61):
        assert check_proof(stores[1].prove_inclusion(seq), latest["vkey"]) is None
    assert check_proof(stores[0].prove_consistency(13), latest["vkey"]) is None


def test_a_node_that_pruned_before_it_had_a_tree_keeps_signing_its_chain(tmp_path: Path) -> None:
    """Records pruned under the legacy scheme leave no leaves to build the tree from: the node goes on signing
    the chain's head (legacy format) and pruning with legacy anchors, and everything still verifies."""
    store = make_store(tmp_path)
    for n in range(12):
        store.append([event(n)])
        store.settle()
    connection = db(tmp_path)
    head = connection.execute("SELECT hash FROM audit_records WHERE seq = 4").fetchone()[0]
    anchor = sign_legacy_checkpoint(store.key.renamed("n1"), 4, head, datetime.now(UTC))
    for statement in (
        "DELETE FROM audit_tree_nodes",
        "DELETE FROM audit_tree",
        "DELETE FROM audit_checkpoints",
        "DELETE FROM audit_records WHERE seq <= 4",
    ):
        connection.execute(statement)
    connection.execute(
        "INSERT INTO audit_checkpoints (tree_size, head_hash, created_at, note, anchor) VALUES (4, ?, ?, ?, 1)",
        (head, "2026-01-01 00:00:00.000000", anchor),
    )
    twelfth = connection.execute("SELECT hash FROM audit_records WHERE seq = 12").fetchone()[0]
    (tmp_path / "latest").write_text(sign_legacy_checkpoint(store.key.renamed("n1"), 12, twelfth, datetime.now(UTC)))
    assert store.verify().ok

    store.append([event(12)])  # a checkpoint is due (the last is old): the chain's head is signed
    store.settle()
    note = (tmp_path / "latest").read_text()
    assert note.startswith("appliance/audit\n13\n")
    assert connection.execute("SELECT note FROM audit_checkpoints WHERE tree_size = 13").fetchone() == (note,)
    [eighth] = [record for record in store.export() if record["seq"] == 8]
    assert store.prune(datetime.fromisoformat(eighth["ts"]), tmp_path / "archive.jsonl") == 3
    result = store.verify()
    assert result.ok and (result.first_seq, result.records) == (8, 6), result
    connection.execute("UPDATE audit_records SET outcome = 'denied' WHERE seq = 10")
    assert store.verify().first_bad_seq == 10


def test_appends_and_other_growers_go_on_while_a_checkpoint_hashes(tmp_path: Path, monkeypatch) -> None:
    """The tree's hashing (about 0.1 ms a record in Python) holds no lock: an append made while it runs is not
    kept waiting. Another process growing the tree meanwhile makes this grower plan again, not write twice."""
    store = make_store(tmp_path, every=10_000)
    store.append([event(n) for n in range(40)])
    store.settle()
    for n in range(40, 60):
        store.append([event(n)])
    hashing = tree.leaf_hash
    during: list[bool] = []

    def hash_and_interfere(data: bytes) -> bytes:
        if not during:
            appended = threading.Thread(target=store.append, args=([event(999)],))
            appended.start()
            appended.join(5)
            during.append(not appended.is_alive())
            with store._engine.begin() as other:  # another gateway process's checkpoint, on the same database
                tree.grow(other)
        return hashing(data)

    monkeypatch.setattr(tree, "leaf_hash", hash_and_interfere)
    assert store.checkpoint() is not None
    assert during == [True], "an append waited for the tree's hashing"
    assert db(tmp_path).execute("SELECT size FROM audit_tree").fetchone() == (61,)
    monkeypatch.undo()
    assert store.verify().ok


def test_on_postgresql_a_prune_between_a_checkpoints_reads_still_yields_a_merkle_checkpoint(
    postgres: PostgresServer, tmp_path: Path, monkeypatch
) -> None:
    """On PostgreSQL each read of a checkpoint's plan sees what is committed when it runs. Another process's
    prune committed between the plan's read of the tree's size and its read of the records (the tree grown, the
    oldest records deleted) must not make this process sign the chain's head in the legacy format."""
    this, other = postgres_stores(postgres, tmp_path, every=10_000)
    this.append([event(n) for n in range(10)])
    this.settle()  # the first checkpoint, signed in the background: the tree holds 10
    this.append([event(n) for n in range(10, 20)])
    this.append([event(n) for n in range(20, 30)])
    [cutoff] = [record for record in this.export() if record["seq"] == 21]
    reading_records = tree.read_records
    interfered: list[int] = []

    def prune_in_between(connection, size, limit):  # type: ignore[no-untyped-def]
        if not interfered:
            interfered.append(size)
            assert other.prune(datetime.fromisoformat(cutoff["ts"]), tmp_path / "archive.jsonl") == 20
            other.append([event(99)])
        return reading_records(connection, size, limit)

    monkeypatch.setattr(tree, "read_records", prune_in_between)
    note = this.checkpoint()
    monkeypatch.undo()
    assert interfered == [10]
    assert note is not None and this.latest_checkpoint()["root_hash"] is not None  # type: ignore[index]
    assert this.latest_checkpoint()["tree_size"] == 31  # type: ignore[index]
    with this._engine.connect() as connection:
        legacy = connection.execute(select(CHECKPOINTS.c.id).where(CHECKPOINTS.c.root_hash.is_(None))).all()
    assert legacy == []
    assert this.verify().ok

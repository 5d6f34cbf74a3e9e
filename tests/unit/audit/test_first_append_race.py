"""Two gateway processes sharing PostgreSQL whose very first audit appends run at once (issue 21, item 2).

Every append locks the chain's head row (``SELECT ... FOR UPDATE``); before the first append there is no row to
lock, so both processes read "empty" and both write record 1: one of them used to fail on the unique sequence
number, and its writer took that for a record the database refuses and replaced it by ``audit.record_rejected``.
Here two stores with engines of their own (each a process's connection pool) append at the same instant, on a
fresh log each round: both appends must succeed and the chain verify."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

from sqlalchemy import text

from appliance.audit.chain import NoteKey
from appliance.audit.store import AuditEvent, AuditStore
from appliance.db.engine import create_schema, make_engine
from tests.support.postgres import PostgresServer

ROUNDS = 12
TABLES = "audit_records, audit_head, audit_checkpoints, audit_tree_nodes, audit_tree, audit_content"


def test_two_processes_making_the_first_append_at_once_both_succeed(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.create_database(f"race_{uuid.uuid4().hex[:8]}")
    key = NoteKey.load_or_create(tmp_path / "audit-key", "test-node")
    engines = [make_engine(url, serialized_writes=True) for _ in range(2)]
    create_schema(engines[0])
    stores = [
        AuditStore(engine, key, latest_checkpoint_file=tmp_path / f"latest-{i}", node=f"gw{i}")
        for i, engine in enumerate(engines)
    ]
    try:
        for round_ in range(ROUNDS):
            with engines[0].begin() as connection:  # a fresh log
                connection.execute(text(f"TRUNCATE {TABLES}"))
            for i in range(2):
                (tmp_path / f"latest-{i}").unlink(missing_ok=True)
            barrier = threading.Barrier(2)
            errors: list[BaseException] = []

            def first_append(store: AuditStore) -> None:
                barrier.wait()
                try:
                    store.append([AuditEvent(event_type="admin.tenant.create", outcome="success", subject=store.node)])
                except Exception as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=first_append, args=(store,)) for store in stores]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            for store in stores:
                store.settle()  # the checkpoint each append may have started
            assert not errors, f"round {round_}: {errors[0]!r}"
            with engines[0].connect() as connection:
                rows = connection.execute(text("SELECT seq, node FROM audit_records ORDER BY seq")).all()
            assert [seq for seq, _ in rows] == [1, 2] and {node for _, node in rows} == {"gw0", "gw1"}
            result = stores[0].verify()
            assert result.ok, result
    finally:
        for engine in engines:
            engine.dispose()

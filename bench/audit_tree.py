"""Cost of the audit log's Merkle tree, on SQLite in a temporary folder.

Prints: how fast the tree grows over stored records (records/s: canonical JSON, SHA-256, node rows), that the
append which makes a checkpoint due does not wait for it (the tree grows and is signed in the background), and
the time of an inclusion and a consistency proof (read from the database) in a tree of --proof-records leaves.
The proof tree's node rows are written directly (random hashes: a proof reads the same rows whatever they hold),
so a tree of a million records takes seconds to set up, not the minutes of appending a million records.

Usage: .venv/bin/python bench/audit_tree.py [--records 50000] [--proof-records 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, update  # noqa: E402

from appliance.audit import tree  # noqa: E402
from appliance.audit.chain import NoteKey  # noqa: E402
from appliance.audit.store import AuditEvent, AuditStore  # noqa: E402
from appliance.db.engine import create_schema, make_engine  # noqa: E402


def event(n: int) -> AuditEvent:
    return AuditEvent(
        event_type="inference.completions",
        outcome="success",
        subject=f"key_{n % 97:020d}",
        subject_kind="api_key",
        tenant_id="ten_0123456789abcdef0123",
        object_type="model",
        object_id="smollm2-135m-instruct",
        source_ip="127.0.0.1",
        user_agent="OpenAI/Python 3.54.0",
        request_id=f"req_{n:032x}",
        detail={"endpoint": "/v1/chat/completions", "status": 200, "prompt_tokens": 35, "completion_tokens": 16},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--proof-records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        engine = make_engine(f"sqlite:///{tmp / 'audit.db'}", serialized_writes=True)
        create_schema(engine)
        store = AuditStore(
            engine,
            NoteKey.load_or_create(tmp / "key", "bench/audit"),
            latest_checkpoint_file=tmp / "latest",
            checkpoint_every=10**9,  # grown below, on purpose
            checkpoint_interval_s=10**9,
            node="bench",
        )
        store.append([event(0)])  # the first record is checkpointed at once
        for start in range(1, args.records, 1000):
            store.append([event(n) for n in range(start, min(start + 1000, args.records))])
        started = time.perf_counter()
        store.checkpoint()
        grow_s = time.perf_counter() - started
        store._every = 1000
        started = time.perf_counter()
        store.append([event(args.records + n) for n in range(999)])
        plain_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        store.append([event(args.records + 999 + n) for n in range(1000)])  # makes a checkpoint due
        due_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        store.settle()
        signed_ms = due_ms + (time.perf_counter() - started) * 1000

        engine2 = make_engine(f"sqlite:///{tmp / 'proofs.db'}", serialized_writes=True)
        create_schema(engine2)
        size = args.proof_records
        started = time.perf_counter()
        with engine2.begin() as connection:
            for level in range(size.bit_length()):
                count = size >> level
                for first in range(0, count, 50_000):
                    rows = [
                        {"level": level, "idx": i, "hash": os.urandom(32)}
                        for i in range(first, min(first + 50_000, count))
                    ]
                    connection.execute(insert(tree.NODES), rows)
            connection.execute(update(tree.TREE).values(size=size))
        setup_s = time.perf_counter() - started
        timings = {"inclusion": 0.0, "consistency": 0.0}
        hashes = {"inclusion": 0, "consistency": 0}
        rounds = 200
        with engine2.connect() as connection:
            for n in range(rounds):
                index = (n * 7919) % size
                started = time.perf_counter()
                hashes["inclusion"] = max(hashes["inclusion"], len(tree.inclusion(connection, index, size)))
                timings["inclusion"] += time.perf_counter() - started
                started = time.perf_counter()
                old = max(1, (n * 104729) % size)
                hashes["consistency"] = max(hashes["consistency"], len(tree.consistency(connection, old, size)))
                timings["consistency"] += time.perf_counter() - started
        db_mb = sum(p.stat().st_size for p in tmp.glob("proofs.db*")) / 1e6  # with its write-ahead log

    print(f"tree growth over {args.records:,} stored records: {args.records / grow_s:10,.0f} records/s")
    print(f"append of 1,000 records: {plain_ms:.0f} ms; with a checkpoint due (signed apart): {due_ms:.0f} ms")
    print(f"tree of {size:,} records: {setup_s:.0f} s to write its nodes directly, {db_mb:,.0f} MB of SQLite")
    print(f"that checkpoint (grow over 1,999 records, sign) was done {signed_ms:.0f} ms after the append began")
    for kind in ("inclusion", "consistency"):
        print(f"{kind} proof at {size:,}: {timings[kind] / rounds * 1000:.2f} ms, at most {hashes[kind]} hashes")


if __name__ == "__main__":
    main()

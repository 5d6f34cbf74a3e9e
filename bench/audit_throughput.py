"""Audit log throughput and verification time, on SQLite in a temporary folder.

Prints: events appended per second one transaction per event (the baseline) and with group commit
(batches, as the gateway's writer does), their ratio, and the time to verify a chain of --records records
(goal: at least 5,000 events/s; verify 1,000,000 records in under 20 s on a 2-core machine).

Usage: .venv/bin/python bench/audit_throughput.py [--records 1000000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--single", type=int, default=2000, help="events appended one per transaction")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        engine = make_engine(f"sqlite:///{tmp / 'audit.db'}", serialized_writes=True)
        create_schema(engine)
        store = AuditStore(
            engine,
            NoteKey.load_or_create(tmp / "key", "bench"),
            latest_checkpoint_file=tmp / "latest",
            checkpoint_every=1000,
            node="bench",
        )

        started = time.perf_counter()
        for n in range(args.single):
            store.append([event(n)])
        single_rate = args.single / (time.perf_counter() - started)

        started = time.perf_counter()
        written = args.single
        while written < args.records:
            size = min(args.batch, args.records - written)
            store.append([event(written + i) for i in range(size)])
            written += size
        batched = args.records - args.single
        batch_rate = batched / (time.perf_counter() - started) if batched else float("nan")

        started = time.perf_counter()
        result = store.verify()
        verify_s = time.perf_counter() - started
        size_mb = (tmp / "audit.db").stat().st_size / 1e6

    print(f"append, one transaction per event (baseline): {single_rate:10,.0f} events/s  (n={args.single})")
    print(f"append, group commit of {args.batch}:          {batch_rate:10,.0f} events/s  (n={batched})")
    print(f"group commit / baseline:                      {batch_rate / single_rate:10.1f}x")
    print(
        f"verify {result.records:,} records, {result.checkpoints} checkpoints: {verify_s:.1f} s "
        f"({result.records / verify_s:,.0f} records/s), ok={result.ok}; database {size_mb:,.0f} MB"
    )


if __name__ == "__main__":
    main()

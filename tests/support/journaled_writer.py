"""A process that hands records to a journaled group-commit writer and is then killed (tests of the journal).

``python -m tests.support.journaled_writer usage|audit DATA_DIR RECORDS COMMITTED``: a writer of that kind on the
SQLite database of DATA_DIR, journals in DATA_DIR/journal, group commits that never come on their own (one hour).
It hands over COMMITTED records and flushes them (committed, with their mark), then hands over the rest, each
acknowledged as durable as an answer would be; prints ``ready`` and kills itself with SIGKILL at once, without
yielding to the event loop again: the writer's group commit would otherwise take what is pending, sooner or later
than a kill sent by the test arrives (on a loaded machine the commit often came first, and the test failed)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent
from appliance.audit.writer import AuditWriter
from appliance.db.engine import create_schema, make_engine
from appliance.ledger.writer import UsageEvent, UsageWriter
from appliance.lib.journal import Journal
from appliance.settings import Settings

HOUR = 3600.0


def usage_event(n: int) -> UsageEvent:
    return UsageEvent(request_id=f"req_{n}", model="m", endpoint="/v1/chat/completions", status_code=200)


def audit_event(n: int) -> AuditEvent:
    return AuditEvent(event_type="inference.completions", outcome="success", request_id=f"req_{n}")


async def usage(data_dir: Path, records: int, committed: int) -> None:
    engine = make_engine(f"sqlite:///{data_dir / 'appliance.db'}")
    create_schema(engine)
    writer = UsageWriter(engine, capacity=10_000, flush_interval_s=HOUR, journal=Journal(data_dir / "journal", "usage"))
    await writer.start()
    for n in range(records):
        if n == committed:
            await writer.flush()
        slot = await writer.acquire()
        await slot.committed(slot.submit(usage_event(n), durable=True))


async def audit(data_dir: Path, records: int, committed: int) -> None:
    writer = AuditWriter(
        audit_store(Settings(data_dir=data_dir)),
        flush_interval_s=HOUR,
        checkpoint_interval_s=HOUR,
        journal=Journal(data_dir / "journal", "audit"),
    )
    await writer.start()
    for n in range(records):
        if n == committed:
            await writer.flush()
        await writer.record(audit_event(n))


async def main() -> None:
    kind, data_dir, records, committed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    await (usage if kind == "usage" else audit)(data_dir, records, committed)
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    asyncio.run(main())

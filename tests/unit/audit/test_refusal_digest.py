"""Refusals of requests that name nobody are all accounted for in the audit log, but a flood of them cannot flood
it (appliance/audit/digest.py): a few per address are recorded one by one, the rest counted and summarised when
the window ends, and the number of records a window makes is bounded whatever the number of addresses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.exc import IntegrityError, OperationalError

from appliance.asgi import create_app
from appliance.audit.chain import NoteKey
from appliance.audit.digest import RefusalDigest, _Summaries
from appliance.audit.store import AuditEvent, AuditStore
from appliance.audit.writer import AuditWriter
from appliance.db.engine import create_schema, make_engine
from appliance.lib.journal import Journal
from appliance.settings import Settings


async def open_writer(folder: Path) -> AuditWriter:
    """An audit writer on the log in ``folder`` (made on first use), started."""
    engine = make_engine(f"sqlite:///{folder / 'audit.db'}", serialized_writes=True)
    create_schema(engine)
    key = NoteKey.load_or_create(folder / "audit-key", "test-node")
    writer = AuditWriter(AuditStore(engine, key, latest_checkpoint_file=folder / "latest", node="n1"))
    await writer.start()
    return writer


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[AuditWriter]:
    writer = await open_writer(tmp_path)
    yield writer
    await writer.stop()


def refusal(address: str, reason: str = "rate_limited") -> AuditEvent:
    return AuditEvent(
        event_type="auth.sign_in", outcome="denied", component="issuer", source_ip=address, detail={"reason": reason}
    )


def records(writer: AuditWriter) -> list[dict[str, Any]]:
    return list(writer.store.export())


async def test_past_a_few_per_address_refusals_are_counted_and_summarised_when_the_window_ends(
    writer: AuditWriter,
) -> None:
    digest = RefusalDigest(writer, window_s=3600, per_source=3, overall=100)
    for _ in range(500):
        await digest.refused(refusal("203.0.113.7"))
    for _ in range(2):
        await digest.refused(refusal("198.51.100.2"))
    await writer.flush()
    assert len(records(writer)) == 3 + 2, "only the first few of each address are recorded one by one"
    digest.summarise()
    await writer.flush()
    summaries = [r for r in records(writer) if "summarised" in r["detail"]]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["source_ip"] == "203.0.113.7" and summary["detail"]["summarised"] == 497
    assert summary["event_type"] == "auth.sign_in" and summary["outcome"] == "denied"
    assert summary["detail"]["reason"] == "rate_limited" and summary["detail"]["first"] <= summary["detail"]["last"]
    # The next window starts afresh.
    await digest.refused(refusal("203.0.113.7"))
    await writer.flush()
    assert len(records(writer)) == 3 + 2 + 1 + 1
    assert writer.store.verify().ok


async def test_a_flood_from_many_addresses_makes_a_bounded_number_of_records(writer: AuditWriter) -> None:
    digest = RefusalDigest(writer, window_s=3600, per_source=5, overall=20, max_sources=50)
    for n in range(3000):
        await digest.refused(refusal(f"10.0.{n // 256}.{n % 256}"))
    digest.summarise()
    await writer.flush()
    found = records(writer)
    one_by_one = [r for r in found if "summarised" not in r["detail"]]
    summaries = [r for r in found if "summarised" in r["detail"]]
    assert len(one_by_one) == 20, "the overall bound of one-by-one records"
    assert len(summaries) == 51, "one per address up to the table's bound, then one for all the others"
    assert sum(r["detail"]["summarised"] for r in summaries) + len(one_by_one) == 3000, "every refusal accounted"
    others = [r for r in summaries if r["source_ip"] is None]
    assert len(others) == 1 and others[0]["detail"]["sources"] == 3000 - 20 - 50


async def test_kinds_of_refusal_are_counted_apart(writer: AuditWriter) -> None:
    digest = RefusalDigest(writer, window_s=3600, per_source=1)
    for _ in range(10):
        await digest.refused(refusal("203.0.113.7", "rate_limited"))
        await digest.refused(refusal("203.0.113.7", "invalid_client"))
    digest.summarise()
    await writer.flush()
    summaries = {
        r["detail"]["reason"]: r["detail"]["summarised"] for r in records(writer) if "summarised" in r["detail"]
    }
    assert summaries == {"rate_limited": 9, "invalid_client": 9}


async def test_a_flood_of_unknown_api_keys_records_a_few_and_summarises_the_rest_at_stop(tmp_path: Path) -> None:
    # Fewer unknown keys than the per-address lookup limit (20), and no tarpit: within one 10 s window.
    settings = Settings(data_dir=tmp_path, identity={"refusal_delay_s": 0})
    app = create_app(settings)
    async with AsyncTestClient(app=app) as client:
        for n in range(15):
            response = await client.get("/v1/models", headers={"Authorization": f"Bearer apk_{n:08d}_wrongsecret"})
            assert response.status_code == 401
        # (the app's tasks run in the test client's portal, on a loop of their own: the writer's flush is not awaited
        # from this one; the records are read as they land)
        refused = await _eventually(
            lambda: [r for r in app.state.audit.store.export() if r["event_type"] == "access.refused"], 5
        )
        assert len(refused) == 5, "five one by one, from the test client's one address"
    # The app stopped: the window's summary was written, and its journal of counted refusals is gone.
    refused = [r for r in app.state.audit.store.export() if r["event_type"] == "access.refused"]
    assert len(refused) == 6 and refused[-1]["detail"]["summarised"] == 10
    assert refused[-1]["detail"]["status"] == 401
    assert not list(settings.journal_dir.glob("refusals-*"))


# A process killed with counts not summarised yet: its journal holds them (appliance/audit/digest.py).
_KILLED_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from appliance.audit.digest import RefusalDigest, _Summaries
from appliance.lib.journal import Journal
from tests.unit.audit.test_refusal_digest import open_writer, refusal

async def main(folder):
    writer = await open_writer(folder)
    digest = RefusalDigest(writer, window_s=3600, per_source=3, journal=Journal(folder / "journal", "refusals"))
    await digest.start()
    for _ in range(200):
        await digest.refused(refusal("203.0.113.7"))
    for _ in range(10):
        await digest.refused(refusal("198.51.100.2", "invalid_client"))
    digest.summarise()  # a first window committed...
    await digest.written()
    for _ in range(12):  # ... and a second one under way
        await digest.refused(refusal("192.0.2.9"))
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(Path(sys.argv[1])))
"""


async def test_counts_of_a_process_killed_before_its_window_ended_are_summarised_by_the_next(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(tmp_path)],
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
        capture_output=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert list((tmp_path / "journal").glob("refusals-*")), "the dead process's counts are in its journal"
    writer = await open_writer(tmp_path)
    try:
        digest = RefusalDigest(writer, window_s=3600, journal=Journal(tmp_path / "journal", "refusals"))
        await digest.start()  # finds the dead process's journal
        found = records(writer)
        one_by_one = [r for r in found if "summarised" not in r["detail"]]
        summaries = {
            (r["source_ip"], r["detail"]["reason"]): r["detail"]["summarised"] for r in found if r not in one_by_one
        }
        assert len(one_by_one) == 3 + 3 + 3
        assert summaries == {
            ("203.0.113.7", "rate_limited"): 197,
            ("198.51.100.2", "invalid_client"): 7,
            ("192.0.2.9", "rate_limited"): 9,  # the window the kill cut short; the first one is not counted again
        }
        assert all(r["event_type"] == "auth.sign_in" and r["outcome"] == "denied" for r in found)
        assert writer.store.verify().ok
        await digest.stop()
        assert not list((tmp_path / "journal").glob("refusals-*")), "the dead journal is removed, and the new one"
    finally:
        await writer.stop()


async def test_a_journal_summarised_again_adds_nothing(writer: AuditWriter, tmp_path: Path) -> None:
    """A process that dies after committing a window's summaries, before its journal's parts are gone: the next
    one reads them again, and the mark committed with the summaries keeps them from being counted twice."""
    sink = _Summaries(writer.store)
    entries = [(seq, refusal("203.0.113.7")) for seq in range(1, 41)]
    sink.write("refusals-dead", entries[:30])
    sink.write("refusals-dead", entries)  # read again from the start: only 31-40 are new
    summaries = [r["detail"]["summarised"] for r in records(writer)]
    assert summaries == [30, 10]
    assert writer.store.journal_mark("refusals-dead") == 40


async def test_with_a_journal_a_window_is_committed_with_its_mark_and_the_journal_emptied(
    writer: AuditWriter, tmp_path: Path
) -> None:
    journal = Journal(tmp_path / "journal", "refusals")
    digest = RefusalDigest(writer, window_s=3600, per_source=1, journal=journal)
    await digest.start()
    for _ in range(25):
        await digest.refused(refusal("203.0.113.7"))
    assert journal.path.stat().st_size > 0, "each counted refusal is journaled before it is answered"
    digest.summarise()
    await digest.written()
    await writer.flush()
    assert [r["detail"].get("summarised") for r in records(writer)] == [None, 24]
    assert writer.store.journal_mark(journal.name) == 24
    assert journal.path.stat().st_size == 0, "what is committed does not stay on the disk"
    await digest.stop()


async def _eventually(read: Any, n: int, within_s: float = 5.0) -> list[dict[str, Any]]:
    """What ``read`` returns once it holds ``n`` items (or at the deadline)."""
    deadline = time.monotonic() + within_s
    found = read()
    while len(found) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        found = read()
    return list(found)


async def test_while_the_database_is_down_the_window_goes_on_and_stop_leaves_the_counts_in_the_journal(
    writer: AuditWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Named fake: the database refusing every append (an outage), which this test cannot cause in SQLite."""

    def down(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("the database is down"))

    monkeypatch.setattr(writer.store, "append", down)
    monkeypatch.setattr(writer.store, "append_made_of", down)
    digest = RefusalDigest(writer, window_s=3600, per_source=0, journal=Journal(tmp_path / "journal", "refusals"))
    await digest.start()
    for _ in range(9):
        await digest.refused(refusal("203.0.113.7"))
    digest.summarise()  # its summary waits for the database...
    for _ in range(5):
        await digest.refused(refusal("198.51.100.2"))
    digest.summarise()  # ... so this window goes on: one window's counts in memory, whatever the outage's length
    assert len(digest._unwritten) == 1
    await digest.stop()  # does not raise: the audit writer stops after it
    assert list((tmp_path / "journal").glob("refusals-*")), "the counts are left for the next process"
    assert not [r for r in records(writer) if "summarised" in r["detail"]]
    monkeypatch.undo()
    # The database is back; the next process summarises them.
    later = RefusalDigest(writer, window_s=3600, journal=Journal(tmp_path / "journal", "refusals"))
    await later.start()
    summaries = {r["source_ip"]: r["detail"]["summarised"] for r in records(writer)}
    assert summaries == {"203.0.113.7": 9, "198.51.100.2": 5}
    await later.stop()
    assert not list((tmp_path / "journal").glob("refusals-*"))


async def test_a_dead_journal_whose_summary_the_database_refuses_is_written_as_refused(
    writer: AuditWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Named fake: the database refusing a summary for its data once (an IntegrityError), which well-formed
    summaries never cause here. The journal is not retried for ever: the record saying so keeps the count."""
    chain = writer.store._chain
    refusals = iter([IntegrityError("INSERT", {}, Exception("refused"))])

    def refusing(*args: Any) -> Any:
        error = next(refusals, None)
        if error is not None:
            raise error
        return chain(*args)

    monkeypatch.setattr(writer.store, "_chain", refusing)
    _Summaries(writer.store).write("refusals-dead", [(seq, refusal("203.0.113.7")) for seq in range(1, 8)])
    [record] = records(writer)
    assert record["event_type"] == "audit.record_rejected" and record["detail"]["summarised"] == 7
    assert writer.store.journal_mark("refusals-dead") == 7

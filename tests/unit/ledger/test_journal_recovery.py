"""Rows acknowledged to an answer survive the process being killed before its group commit (issue #16 item 3):
the next writer writes what the dead process's journal holds past its mark, exactly once, and removes it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from appliance.db.engine import create_schema, make_engine
from appliance.ledger.writer import UsageWriter, _commit_rows
from appliance.lib.journal import Journal
from tests.support.killed import killed_writer
from tests.unit.ledger.test_writer import event

RECORDS = 20


def request_ids(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return sorted(row[0] for row in connection.execute(text("SELECT request_id FROM usage_records")))


def marks(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text("SELECT journal, seq FROM journal_marks"))]


def expected(count: int) -> list[str]:
    return sorted(f"req_{n}" for n in range(count))


def writer(engine: Engine, data_dir: Path, **options: float) -> UsageWriter:
    return UsageWriter(engine, capacity=1000, batch_size=8, journal=Journal(data_dir / "journal", "usage"), **options)


@pytest.mark.parametrize("committed", [0, 7])
async def test_rows_of_a_killed_process_are_written_once_by_the_next_writer(tmp_path: Path, committed: int) -> None:
    killed_writer("usage", tmp_path, RECORDS, committed)
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    assert request_ids(engine) == expected(committed), "only the flushed rows reached the database before the kill"
    next_writer = writer(engine, tmp_path)
    await next_writer.start()
    assert request_ids(engine) == expected(RECORDS), "every acknowledged row, none twice"
    assert [path.name for path in (tmp_path / "journal").glob("*.journal")] == [next_writer._journal.path.name]  # type: ignore[union-attr]
    assert marks(engine) == [], "the dead journal's mark goes with it"
    await next_writer.stop()
    assert list((tmp_path / "journal").glob("*.journal")) == [] and marks(engine) == []
    engine.dispose()


async def test_a_running_writer_takes_a_dead_journal_and_two_writers_never_both_take_it(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    first, second = writer(engine, tmp_path, adopt_interval_s=0.05), writer(engine, tmp_path, adopt_interval_s=0.05)
    await asyncio.gather(first.start(), second.start())
    killed_writer("usage", tmp_path, RECORDS, 3)
    for _ in range(200):
        if len(request_ids(engine)) >= RECORDS:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # both writers looked again meanwhile
    assert request_ids(engine) == expected(RECORDS)
    await asyncio.gather(first.stop(), second.stop())
    assert request_ids(engine) == expected(RECORDS) and marks(engine) == []
    engine.dispose()


async def test_rows_handed_over_are_committed_after_the_answer_and_a_flush_waits_for_them(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    live = writer(engine, tmp_path, flush_interval_s=3600)
    await live.start()
    for n in range(5):
        slot = await live.acquire()
        assert slot.submit(event(n), durable=True) is None, "journaled: the answer does not wait for the database"
    assert request_ids(engine) == []
    await live.flush()
    assert request_ids(engine) == expected(5)
    [(journal, seq)] = marks(engine)
    assert (journal, seq) == (live._journal.name, 5)  # type: ignore[union-attr]
    await live.stop()
    engine.dispose()


def test_a_batch_written_again_after_its_commit_landed_is_not_written_twice(tmp_path: Path) -> None:
    """A commit whose outcome was lost (the connection dropped after the server committed) is retried: the journal's
    mark, read under lock in the retry's own transaction, says which rows are in already."""
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    batch = [event(n) for n in range(4)]
    _commit_rows(engine, batch[:3], "usage-x", [1, 2, 3])
    _commit_rows(engine, batch, "usage-x", [1, 2, 3, 4])  # the retry, with one more row queued meanwhile
    assert request_ids(engine) == expected(4)
    assert marks(engine) == [("usage-x", 4)]
    engine.dispose()


async def test_a_journaled_row_that_does_not_decode_is_replaced_by_a_row_saying_so(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'appliance.db'}")
    create_schema(engine)
    dead = Journal(tmp_path / "journal", "usage")
    dead.open()
    bad = event(0)
    bad.latency_ms = float("nan")  # JSON has no NaN: the journal holds null, which a row's float refuses
    for row in (bad, event(1)):
        dead.append(msgspec.json.encode(row))
    dead.close(remove=False)  # its process died
    live = writer(engine, tmp_path)
    await live.start()
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT request_id, error_code FROM usage_records")).all())
    assert rows == {"req_0": "usage_record_rejected", "req_1": None}, "nothing after it is held up"
    await live.stop()
    engine.dispose()

"""Rows acknowledged to an answer survive the process being killed before its group commit (issue #16 item 3):
the next writer writes what the dead process's journal holds past its mark, exactly once, and removes it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from appliance.db.engine import create_schema, make_engine
from appliance.ledger.writer import UsageWriter
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

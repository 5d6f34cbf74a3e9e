import asyncio
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.ledger.models import UsageRecord
from appliance.ledger.writer import UsageEvent, UsageWriter
from appliance.lib.errors import ServiceUnavailableError


def count(engine) -> int:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(UsageRecord)).one()[0])


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


def event(n: int) -> UsageEvent:
    return UsageEvent(request_id=f"req_{n}", model="m", endpoint="/v1/chat/completions", status_code=200)


async def test_submitted_records_are_written_in_batches(db) -> None:  # type: ignore[no-untyped-def]
    writer = UsageWriter(db, capacity=100, batch_size=10, flush_interval_s=0.01)
    await writer.start()
    for n in range(25):
        (await writer.acquire()).submit(event(n))
    await writer.stop()
    assert count(db) == 25
    assert writer.written == 25


async def test_full_queue_applies_back_pressure_then_refuses(db) -> None:  # type: ignore[no-untyped-def]
    writer = UsageWriter(db, capacity=2, flush_interval_s=0.01, acquire_timeout_s=0.2)
    await writer.start()
    first, second = await writer.acquire(), await writer.acquire()
    with pytest.raises(ServiceUnavailableError):
        await writer.acquire()  # two requests in flight hold both slots
    waiter = asyncio.create_task(writer.acquire())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    first.submit(event(1))  # written, then its slot is free again
    third = await asyncio.wait_for(waiter, 2)
    second.release()
    third.submit(event(3))
    await writer.stop()
    assert count(db) == 2


async def test_nothing_is_dropped_while_the_database_fails(tmp_path: Path) -> None:
    db_path = tmp_path / "ledger.db"
    engine = make_engine(f"sqlite:///{db_path}")
    writer = UsageWriter(engine, capacity=10, flush_interval_s=0.01)
    await writer.start()
    for n in range(3):
        (await writer.acquire()).submit(event(n))  # the table does not exist yet: writes fail
    await asyncio.sleep(0.3)
    assert writer.written == 0 and writer.pending == 3
    create_schema(engine)  # the database recovers; the retries write everything
    await writer.stop()
    assert count(engine) == 3
    engine.dispose()


async def test_a_slot_takes_one_record_only(db) -> None:  # type: ignore[no-untyped-def]
    writer = UsageWriter(db, capacity=5, flush_interval_s=0.01)
    await writer.start()
    slot = await writer.acquire()
    slot.submit(event(1))
    slot.submit(event(2))
    slot.release()
    await writer.stop()
    assert count(db) == 1

"""One usage row the database refuses must not block the ledger (issue #21): client-controlled text is bounded
before it reaches a row, and a row still refused is replaced by one saying so while the others are written."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import select
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.ledger.models import UsageRecord
from appliance.ledger.writer import UsageEvent, UsageWriter
from tests.support.postgres import PostgresServer


def event(n: int, **fields: object) -> UsageEvent:
    return UsageEvent(
        request_id=f"req_{n}",
        model="m",
        endpoint="/v1/chat/completions",
        status_code=200,
        **fields,  # type: ignore[arg-type]
    )


def rows(engine) -> dict[str, UsageRecord]:  # type: ignore[no-untyped-def]
    with Session(engine) as session:
        return {row.request_id: row for row in session.exec(select(UsageRecord)).scalars()}


@pytest.fixture
def pg(postgres: PostgresServer):  # type: ignore[no-untyped-def]
    engine = make_engine(postgres.create_database(f"ledger_{uuid.uuid4().hex[:12]}"))
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.mark.timeout(30)
async def test_claims_longer_than_their_columns_are_bounded_not_fatal_on_postgresql(pg) -> None:  # type: ignore[no-untyped-def]
    writer = UsageWriter(pg, capacity=10, flush_interval_s=0.01)
    await writer.start()
    (await writer.acquire()).submit(event(1, subject="s" * 100_000, workflow_id="w" * 1000, agent_id="\x00a"))
    (await writer.acquire()).submit(event(2))
    await asyncio.wait_for(writer.stop(), 10)
    written = rows(pg)
    assert set(written) == {"req_1", "req_2"}
    assert len(written["req_1"].subject or "") == 300 and (written["req_1"].subject or "").startswith("sss")
    assert len(written["req_1"].workflow_id or "") == 32
    assert written["req_1"].agent_id == "\ufffda"


@pytest.mark.timeout(30)
async def test_a_row_the_database_refuses_is_replaced_and_the_rest_are_written_on_postgresql(pg) -> None:  # type: ignore[no-untyped-def]
    writer = UsageWriter(pg, capacity=10, batch_size=10, flush_interval_s=0.05)
    await writer.start()
    slots = [await writer.acquire() for _ in range(4)]
    # An engine that reports an absurd token count (past PostgreSQL's integer): only the database refuses it.
    for n, slot in enumerate(slots):
        slot.submit(event(n, prompt_tokens=2**40) if n == 2 else event(n, prompt_tokens=n))
    await asyncio.wait_for(writer.stop(), 10)
    written = rows(pg)
    assert set(written) == {"req_0", "req_1", "req_2", "req_3"}, "nothing is dropped"
    assert [written[f"req_{n}"].prompt_tokens for n in (0, 1, 3)] == [0, 1, 3]
    replaced = written["req_2"]
    assert replaced.error_code == "usage_record_rejected"
    assert (replaced.model, replaced.status_code) == ("m", 200)
    assert writer.written == 4 and writer.pending == 0


@pytest.mark.timeout(30)
async def test_a_duplicate_request_id_is_kept_apart_not_retried_for_ever(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    create_schema(engine)
    writer = UsageWriter(engine, capacity=10, batch_size=10, flush_interval_s=0.05)
    await writer.start()
    for n in (1, 1, 2):
        (await writer.acquire()).submit(event(n))
    await asyncio.wait_for(writer.stop(), 10)
    written = rows(engine)
    assert len(written) == 3 and {"req_1", "req_2"} <= set(written)
    duplicate = next(row for rid, row in written.items() if rid.startswith("req_1~dup"))
    assert duplicate.error_code == "usage_record_rejected"
    engine.dispose()

"""The database (PostgreSQL) stopped and started again under load (issue 21, item 2).

A gateway process on a PostgreSQL server of its own takes a steady load (plain answers and streams) on a budgeted
key; the server is stopped (``pg_ctl stop -m fast``: every connection is cut) for a few seconds, then started
again. While it is down, what is answered is refused with 503 in the OpenAI error envelope; no request is served
unmetered (every answer the client saw whole has its usage row and its audit record); service comes back by
itself, without restarting the gateway, and the audit chain verifies. The engine is the fast fake of
tests/support: the engine is not what is tested."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import create_engine, text

from tests.support.fake_engine import FakeEngine
from tests.support.postgres import PostgresServer
from tests.support.processes import Gateway, cli, node_env, running_gateway

RATE = 40  # requests a second
BEFORE_S = 1.5
DOWN_S = 5.0
RECOVERY_LIMIT_S = 20.0  # from the server's start to answers again


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0: no HTTP answer at all
    request_id: str | None
    whole: bool  # the client saw the whole answer (a stream up to [DONE])
    error: dict[str, object] | None = None


@pytest.fixture
def database() -> Iterator[PostgresServer]:
    """A server of this test's own: stopping the session's would take the other tests' databases down with it."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def gateway(tmp_path: Path, fake_engine: FakeEngine, database: PostgresServer) -> Iterator[Gateway]:
    env = node_env(
        tmp_path / "data",
        fake_engine.url,
        APPLIANCE_DATABASE__URL=database.create_database("appliance"),
        APPLIANCE_SERVER__LOG_LEVEL="warning",
    )
    with running_gateway(env, tmp_path / "gateway.log") as gateway:
        yield gateway


async def _one(session: aiohttp.ClientSession, url: str, key: str, stream: bool) -> Outcome:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "stream": stream}
    started = time.monotonic()
    try:
        async with session.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            payload = await response.read()
            outcome = Outcome(started, time.monotonic(), response.status, response.headers.get("x-request-id"), False)
            if response.status != 200:
                outcome.error = json.loads(payload).get("error")
            else:
                outcome.whole = (
                    payload.rstrip().endswith(b"data: [DONE]") if stream else "choices" in json.loads(payload)
                )
            return outcome
    except aiohttp.ClientError:
        return Outcome(started, time.monotonic(), 0, None, False)


async def _load(gateway: Gateway, key: str, database: PostgresServer) -> tuple[list[Outcome], float, float, float]:
    """Outcomes, and when the server was down (from its stop to its start) and when answers came back."""
    outcomes: list[Outcome] = []
    marks: dict[str, float] = {}
    done = asyncio.Event()

    async def arrivals() -> None:
        """Open loop: new clients keep coming (every 1/RATE s) whatever happens to those already waiting."""
        tasks: list[asyncio.Task[None]] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one(turn: int) -> None:
                outcomes.append(await _one(session, gateway.url, key, stream=turn % 3 == 0))

            turn = 0
            while not done.is_set():
                turn += 1
                tasks.append(asyncio.create_task(one(turn)))
                await asyncio.sleep(1 / RATE)
            await asyncio.gather(*tasks)

    async def outage() -> None:
        await asyncio.sleep(BEFORE_S)
        marks["stopping"] = time.monotonic()
        await asyncio.to_thread(database.halt)
        marks["down"] = time.monotonic()
        await asyncio.sleep(DOWN_S)
        marks["starting"] = time.monotonic()
        await asyncio.to_thread(database.resume)
        marks["up"] = time.monotonic()
        while time.monotonic() - marks["up"] < RECOVERY_LIMIT_S:  # until a second of answers, all whole
            await asyncio.sleep(0.2)
            recent = [o for o in outcomes if o.started > marks["up"]]
            served = [o for o in recent if o.status == 200 and o.whole]
            if (
                served
                and all(o.status == 200 for o in recent if o.started > served[0].started)
                and (time.monotonic() - served[0].started > 1.0)
            ):
                marks["recovered"] = served[0].ended
                break
        done.set()

    await asyncio.gather(outage(), arrivals())
    return outcomes, marks["down"], marks["starting"], marks.get("recovered", float("inf")) - marks["up"]


def test_the_database_stopped_under_load_refuses_with_503_meters_every_answer_and_recovers_by_itself(
    gateway: Gateway, database: PostgresServer
) -> None:
    env = gateway.env
    key = json.loads(cli(env, "admin", "create-key", "--tenant", "acme", "--workflow", "bots", "--create"))
    admin = cli(env, "admin", "token", "--role", "admin")

    async def budget() -> None:
        body = {"scope_type": "workflow", "scope_id": key["workflow_id"], "kind": "tokens", "limit": 10_000_000}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
            async with session.post(gateway.url + "/admin/budgets/", json=body) as response:
                assert response.status == 201, await response.text()

    asyncio.run(budget())
    outcomes, down, starting, recovery_s = asyncio.run(_load(gateway, key["key"], database))

    assert recovery_s < RECOVERY_LIMIT_S, "answers did not come back after the database did"
    assert gateway.process is not None and gateway.process.poll() is None, "the gateway kept running"
    during = [o for o in outcomes if o.started >= down and o.ended <= starting]
    assert len(during) >= RATE, "requests met the outage"
    refused = [o for o in during if o.status != 200]
    assert refused and all(o.status == 503 for o in refused), sorted({o.status for o in refused})
    for outcome in refused:  # the OpenAI error envelope
        assert outcome.error is not None and {"message", "type", "code"} <= set(outcome.error), outcome.error
    assert all(o.status != 0 for o in outcomes), "every request got an HTTP answer"

    answered = {str(o.request_id) for o in outcomes if o.status == 200 and o.whole}
    database_url = env["APPLIANCE_DATABASE__URL"]
    assert gateway.stop(), "a clean stop: what it journaled is committed"
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows: dict[str, int] = dict(
                connection.execute(text("SELECT request_id, status_code FROM usage_records")).all()
            )
            audited: dict[str, str] = dict(
                connection.execute(
                    text("SELECT request_id, outcome FROM audit_records WHERE event_type LIKE 'inference.%'")
                ).all()
            )
    finally:
        engine.dispose()
    unmetered = sorted(r for r in answered if rows.get(r) != 200 or audited.get(r) != "success")
    assert not unmetered, f"{len(unmetered)} of {len(answered)} answers without their row or record: {unmetered[:5]}"
    verified = json.loads(cli(env, "audit", "verify", "--json"))
    assert verified["ok"], verified

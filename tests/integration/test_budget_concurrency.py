"""Budgets exact under concurrency, with the real engine: 200 concurrent requests of mixed shapes (n choices,
both caps, lists of prompts, token ids) against one budget, some streamed, some disconnecting mid-stream or before
the answer. Once on the session's appliance (one gateway
process, SQLite), once on two gateway processes sharing a real PostgreSQL server (the multi-replica case).

After each run: what the budgets recorded never exceeds their limits and equals what the ledger's rows add
up to, every answered request has its row, and no reservation is left dangling."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from sqlalchemy import create_engine, text

from tests.integration.conftest import (
    CHAT_MODEL,
    TEST_DATA_DIR,
    Appliance,
    cli_output,
    gateway_env,
    start_gateway,
    stop_gateway,
)
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.integration

REQUESTS = 200
TOKEN_LIMIT = 2500
CALL_LIMIT = 120
REPLICA_PORTS = (18091, 18092)


@dataclass
class Target:
    """Gateways sharing one database, and how to reach that database and the CLI."""

    urls: list[str]
    database_url: str
    env: dict[str, str]

    def cli(self, *args: str) -> str:
        return cli_output(self.env, *args)


@pytest.fixture(scope="module")
def replicas(appliance: Appliance, postgres: PostgresServer) -> Iterator[Target]:
    """Two gateway processes (uvicorn, as `appliance up` runs it) on one PostgreSQL database, in front of
    the session's real engines."""
    data_dir = TEST_DATA_DIR / "replicas"
    env = gateway_env(appliance, data_dir, APPLIANCE_DATABASE__URL=postgres.create_database("replicas"))
    target = Target([f"http://127.0.0.1:{port}" for port in REPLICA_PORTS], env["APPLIANCE_DATABASE__URL"], env)
    target.cli("admin", "token", "--role", "admin")  # schema and secrets made once, before the processes race
    processes = [start_gateway(env, port, data_dir / f"gateway-{port}.log") for port in REPLICA_PORTS]
    yield target
    for process in processes:
        stop_gateway(process)


@pytest.fixture(scope="module")
def single(appliance: Appliance) -> Target:
    return Target([appliance.gateway_url], f"sqlite:///{appliance.data_dir / 'appliance.db'}", appliance.env)


def _shape(i: int) -> tuple[str, dict[str, Any]]:
    """The request shapes of #15, in turn: a plain chat, n choices with both caps, a list of prompts, token ids."""
    question = f"Count from one to {i % 7 + 3}, in words."
    shape = (i // 4) % 4
    if shape == 0:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": question}], "max_tokens": 8 + i % 17}
    if shape == 1:
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": question}],
            "n": 3,
            "max_tokens": 1,
            "max_completion_tokens": 12,
            "ignore_eos": True,
        }
    if shape == 2:
        return "/v1/completions", {"prompt": [question, "Once upon a time", "The sea"], "max_tokens": 10}
    return "/v1/completions", {"prompt": [[1, 422, 3303, 314], [1, 422]], "n": 2, "max_tokens": 8, "ignore_eos": True}


async def _one(session: aiohttp.ClientSession, url: str, key: str, i: int) -> str:
    mode = ("answer", "stream", "stream-then-leave", "leave-before-answer")[i % 4]
    path, shape = _shape(i)
    body = {"model": CHAT_MODEL, "stream": mode.startswith("stream"), **shape}
    timeout = aiohttp.ClientTimeout(total=0.1 + (i % 5) * 0.1 if mode == "leave-before-answer" else 300)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        async with session.post(url + path, json=body, headers=headers, timeout=timeout) as reply:
            if mode == "stream-then-leave" and reply.status == 200:
                await reply.content.readline()  # the first event, then hang up
                reply.close()
                return "left"
            await reply.read()
            return str(reply.status)
    except TimeoutError:
        return "left"


async def _hammer(target: Target, key: str) -> Counter[str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        outcomes = await asyncio.gather(
            *(_one(session, target.urls[i % len(target.urls)], key, i) for i in range(REQUESTS))
        )
    return Counter(outcomes)


def _ledger(target: Target, workflow_id: str) -> dict[str, int]:
    engine = create_engine(target.database_url)
    try:
        with engine.connect() as connection:
            rows, ledger_tokens = connection.execute(
                text("SELECT count(*), coalesce(sum(total_tokens), 0) FROM usage_records WHERE workflow_id = :w"),
                {"w": workflow_id},
            ).one()
            dangling = connection.execute(text("SELECT count(*) FROM budget_reservations")).scalar_one()
            budget_used = dict(
                connection.execute(
                    text(
                        "SELECT 'budget_' || b.kind, c.used FROM budget_counters c "
                        "JOIN budgets b ON b.id = c.budget_id "
                        "WHERE b.scope_id = :w OR b.scope_id = (SELECT tenant_id FROM workflows WHERE id = :w)"
                    ),
                    {"w": workflow_id},
                ).all()
            )
            reserved = connection.execute(text("SELECT coalesce(sum(reserved), 0) FROM budget_counters")).scalar_one()
    finally:
        engine.dispose()
    return {"rows": rows, "ledger_tokens": ledger_tokens, "dangling": dangling, "reserved": reserved, **budget_used}


async def _run(target: Target, tenant: str) -> None:
    tenant = f"{tenant}-{uuid.uuid4().hex[:6]}"  # its own budgets, also when the appliance is reused
    created = json.loads(target.cli("admin", "create-key", "--tenant", tenant, "--workflow", "swarm", "--create"))
    admin = target.cli("admin", "token", "--role", "admin").strip()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
        for body in (
            {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "limit": TOKEN_LIMIT},
            {"scope_type": "tenant", "scope_id": created["tenant_id"], "kind": "requests", "limit": CALL_LIMIT},
        ):
            async with session.post(target.urls[0] + "/admin/budgets/", json=body) as response:
                assert response.status == 201, await response.text()

    started = time.monotonic()
    outcomes = await _hammer(target, created["key"])
    print(f"\n{tenant}: {dict(outcomes)} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    assert outcomes["200"] > 0 and outcomes["429"] > 0 and outcomes["left"] > 0, outcomes
    assert set(outcomes) == {"200", "429", "left"}, "answered or refused by a budget; never failed (a 503)"

    answered = outcomes["200"] + outcomes["429"]
    ledger: dict[str, int] = {}
    for _ in range(150):  # settlement of a request whose client left, and ledger rows, land off the hot path
        ledger = _ledger(target, created["workflow_id"])
        if ledger["rows"] >= answered and ledger["dangling"] == 0 and ledger["reserved"] == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # rows of requests whose client left early may still be on their way
    ledger = _ledger(target, created["workflow_id"])
    print(f"{tenant}: {ledger}", file=sys.stderr)
    # A client that left before the gateway got to its request leaves no row; every other request leaves one.
    assert answered <= ledger["rows"] <= REQUESTS
    assert ledger["dangling"] == 0 and ledger["reserved"] == 0, "every reservation was settled"
    assert ledger["budget_tokens"] <= TOKEN_LIMIT and ledger["budget_requests"] <= CALL_LIMIT
    assert ledger["budget_tokens"] == ledger["ledger_tokens"], "the budget charged exactly what the ledger recorded"


async def test_one_gateway_on_sqlite_never_overspends(single: Target) -> None:
    await _run(single, "swarm-sqlite")


async def test_two_gateways_on_postgresql_never_overspend(replicas: Target) -> None:
    await _run(replicas, "swarm-postgres")
    cli_output(replicas.env, "audit", "verify")  # the chain two processes wrote holds

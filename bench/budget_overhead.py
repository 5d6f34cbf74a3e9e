"""What budget enforcement costs, on SQLite and on PostgreSQL, against a baseline in the same run.

Part 1 (added latency per request): one gateway process (uvicorn) in front of the fast fake upstream
(tests/support/fake_engine.py, a process of its own). Two API keys of the same tenant take turns, request
by request: one whose chain has no budget (the baseline: one read finds none), one whose chain has a token,
a call and a money budget on its workflow and tenant (prompt counted through the engine's /tokenize, four
reservations, settlement). Prints P50/P99 of both and the difference, closed loop with `--concurrency`
clients.

Part 2 (reservations per second): BudgetStore.reserve + settle, the database work of one request, from
`--threads` threads for `--seconds`, against a chain of two budgets; prints throughput and P50/P99 of one
reserve+settle.

PostgreSQL is a private server from the Debian package (durable: fsync on), started for the run.
Usage: .venv/bin/python bench/budget_overhead.py [--requests 400] [--concurrency 1] [--threads 8]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.budgets.models import Budget  # noqa: E402
from appliance.budgets.store import BudgetExceededError, BudgetStore  # noqa: E402
from appliance.db.engine import create_schema, make_engine  # noqa: E402
from appliance.identity.models import Tenant, Workflow  # noqa: E402
from appliance.ledger.pricing import Price  # noqa: E402
from bench.gateway_overhead import cli, pct, row, spawn_fake, spawn_gateway, wait_up  # noqa: E402
from tests.support.fake_engine import free_port  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 16}
LARGE = 10**12  # budgets that never run out: the benchmark measures their cost, not refusals


# -- part 1: added latency through the gateway ----------------------------------------------------------


def make_keys(env: dict[str, str], gateway: str) -> tuple[str, str]:
    """(key without budgets, key whose workflow and tenant carry token, call and money budgets)."""
    free = json.loads(cli(env, "admin", "create-key", "--tenant", "bench", "--workflow", "free", "--create").stdout)
    held = json.loads(cli(env, "admin", "create-key", "--tenant", "bench", "--workflow", "held", "--create").stdout)
    admin = cli(env, "admin", "token", "--role", "admin").stdout.strip()

    async def create() -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
            for scope_type, scope_id in (("workflow", held["workflow_id"]), ("tenant", held["tenant_id"])):
                for kind, limit in (("tokens", LARGE), ("requests", LARGE), ("cost", 10**8)):
                    body = {"scope_type": scope_type, "scope_id": scope_id, "kind": kind, "limit": limit}
                    async with session.post(gateway + "/admin/budgets/", json=body) as response:
                        assert response.status == 201, await response.text()

    asyncio.run(create())
    return str(free["key"]), str(held["key"])


async def closed_loop(gateway: str, keys: dict[str, str], requests: int, concurrency: int) -> dict[str, list[float]]:
    """Each client alternates the keys request by request, so drift hits both alike."""
    latencies: dict[str, list[float]] = {name: [] for name in keys}
    counter = itertools.count()
    names = list(keys)

    async def client(session: aiohttp.ClientSession) -> None:
        while (index := next(counter)) < requests:
            name = names[index % len(names)]
            started = time.perf_counter()
            headers = {"Authorization": f"Bearer {keys[name]}"}
            async with session.post(gateway + "/v1/chat/completions", json=CHAT, headers=headers) as response:
                await response.read()
                assert response.status == 200, await response.text()
            latencies[name].append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return latencies


def part1(label: str, database_url: str | None, requests: int, concurrency: int) -> None:
    fake_port, gateway_port = free_port(), free_port()
    data_dir = ROOT / "var" / f"bench-budgets-{label}"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = dict(
        os.environ,
        APPLIANCE_DATA_DIR=str(data_dir),
        APPLIANCE_GATEWAY__ROUTES=json.dumps([{"model": "fake", "url": f"http://127.0.0.1:{fake_port}"}]),
        APPLIANCE_PRICING__MODELS=json.dumps({"fake": {"prompt_per_million": 0.2, "completion_per_million": 0.8}}),
    )
    if database_url:
        env["APPLIANCE_DATABASE__URL"] = database_url
    fake = spawn_fake(fake_port)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    cli(env, "admin", "token", "--role", "admin")  # schema and secrets, before the gateway starts
    gateway = spawn_gateway(gateway_port, env, data_dir / "gateway.log")
    try:
        asyncio.run(wait_up(f"http://127.0.0.1:{fake_port}/health"))
        asyncio.run(wait_up(gateway_url + "/healthz"))
        free, held = make_keys(env, gateway_url)
        keys = {"no budget": free, "6 budgets": held}
        asyncio.run(closed_loop(gateway_url, keys, 100, concurrency))  # warm-up
        latencies = asyncio.run(closed_loop(gateway_url, keys, requests, concurrency))
        print(f"\nPart 1 ({label}): through the gateway, {concurrency} closed-loop clients, keys alternating")
        for name, values in latencies.items():
            print(row(name, values))
        base, held_values = latencies["no budget"], latencies["6 budgets"]
        print(
            f"  budgets add P50 {pct(held_values, 50) - pct(base, 50):+.2f} ms, "
            f"P99 {pct(held_values, 99) - pct(base, 99):+.2f} ms "
            f"(P50 ratio {pct(held_values, 50) / pct(base, 50):.2f})"
        )
    finally:
        for process in (gateway, fake):
            process.terminate()
            process.wait(30)


# -- part 2: reservations per second --------------------------------------------------------------------


def store_for(url: str) -> BudgetStore:
    from sqlmodel import Session

    create_schema(make_engine(url))
    with Session(make_engine(url)) as session:
        session.add(Tenant(id="ten_b", name="bench"))
        session.add(Workflow(id="wf_b", tenant_id="ten_b", name="w"))
        session.flush()  # the budgets refer to them
        for scope_type, scope_id in (("workflow", "wf_b"), ("tenant", "ten_b")):
            session.add(
                Budget(
                    tenant_id="ten_b",
                    scope_type=scope_type,
                    scope_id=scope_id,
                    kind="tokens",
                    period="day",
                    limit=LARGE,
                    created_by="bench",
                )
            )
        session.commit()
    return BudgetStore(make_engine(url, serialized_writes=True), ZoneInfo("UTC"))


def part2(label: str, url: str, threads: int, seconds: float) -> None:
    store = store_for(url)
    chain = {"workflow": "wf_b", "tenant": "ten_b"}
    price = Price(0.2, 0.8)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    deadline = time.perf_counter() + seconds
    errors = 0

    def work(slot: int) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            request_id = uuid.uuid4().hex
            started = time.perf_counter()
            try:
                grant = store.reserve(request_id, chain, prompt_tokens=30, max_tokens=64, price=price)
                store.settle(request_id, 30 + (grant.max_tokens or 0) // 2, price.cost(30, 32))
            except BudgetExceededError:
                errors += 1
            latencies[slot].append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    every = [value for values in latencies for value in values]
    print(
        row(f"{label}: reserve+settle, {threads} threads", every)
        + f"   {len(every) / elapsed:7.0f} reservations/s, {errors} refused"
    )
    assert store.dangling() == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests in part 1, per database")
    parser.add_argument("--concurrency", type=int, default=1, help="closed-loop clients in part 1")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--skip-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args()
    postgres = PostgresServer(durable=True).start()
    try:
        sqlite_dir = ROOT / "var" / "bench-budget-store"
        shutil.rmtree(sqlite_dir, ignore_errors=True)
        sqlite_dir.mkdir(parents=True)
        if not args.skip_sqlite:
            part1("sqlite", None, args.requests, args.concurrency)
        part1("postgresql", postgres.create_database("gateway"), args.requests, args.concurrency)
        print(f"\nPart 2: the budget store alone, {args.seconds:.0f}s per database")
        part2("sqlite", f"sqlite:///{sqlite_dir / 'budgets.db'}", args.threads, args.seconds)
        part2("postgresql", postgres.create_database("store"), args.threads, args.seconds)
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()

"""A drift finding and a placement report from a real run: the real vLLM CPU engine, driven through the appliance
by one workflow whose answers double in length.

1. `appliance up` on ports of its own (data in var/bench-drift, node costs configured so cost per 1M tokens is
   computed from what the engine served, two alternative placements priced);
2. baseline phase: `--requests` chat completions of workflow `wf-answers` (agent `writer`), each answer 16-32
   tokens (`max_tokens` drawn in that range, `ignore_eos` so the engine writes that many), half of them streamed;
3. the baseline rows are moved one day back in the ledger (`created_at` minus 24 h): a real week cannot pass in a
   benchmark, and the drift report compares the last hour with the 7 days before it. Nothing else is changed;
4. recent phase: the same number of requests, answers 32-64 tokens (twice as long);
5. prints `appliance drift report --window hour` and `appliance placement report` as the CLI prints them, and
   the context-utilisation comparison of the workflow (from the context length each usage row records).

Usage: .venv/bin/python bench/drift_run.py [--requests 60] [--concurrency 4] [--keep-up]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import CHAT_MODEL, cli  # noqa: E402

DATA_DIR = ROOT / "var" / "bench-drift"
TOPICS = ("rivers", "bridges", "orchards", "lighthouses", "libraries", "glaciers", "markets", "railways")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        APPLIANCE_DATA_DIR=str(DATA_DIR),
        APPLIANCE_MODELS_CACHE_DIR=str(ROOT / "var" / "models"),
        APPLIANCE_CONFIG=str(DATA_DIR / "none.toml"),
        APPLIANCE_SERVER__PORT="29080",
        APPLIANCE_ENGINES__PORT_BASE="29101",
        # What the node cost, as the installer records it: cost per 1M tokens follows from what the engine serves.
        APPLIANCE_PRICING__NODE__HARDWARE_PRICE="9000",
        APPLIANCE_PRICING__NODE__AMORTISATION_MONTHS="36",
        APPLIANCE_PRICING__NODE__POWER_WATTS="120",
        APPLIANCE_PRICING__NODE__POWER_PRICE_PER_KWH="0.25",
        APPLIANCE_PRICING__NODE__OPERATIONS_PER_MONTH="150",
        APPLIANCE_PRICING__TOKENS_PER_SECOND="40",
        APPLIANCE_PLACEMENT__ALTERNATIVES=json.dumps(
            {
                "hosted-small-model-api": {"prompt_per_million": 0.15, "completion_per_million": 0.60},
                "rented-gpu-hour": {"prompt_per_million": 0.40, "completion_per_million": 0.40},
            }
        ),
    )
    return env


def checked(env: dict[str, str], *args: str) -> str:
    result = cli(env, *args)
    if result.returncode != 0:
        sys.exit(f"appliance {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return str(result.stdout)


async def phase(url: str, key: str, count: int, tokens: tuple[int, int], concurrency: int, seed: int) -> list[str]:
    """``count`` chat completions through the gateway; returns their request ids."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"}

    async def one(session: aiohttp.ClientSession, index: int) -> str:
        streamed = index % 2 == 1
        body: dict[str, Any] = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": f"Write a few sentences about {rng.choice(TOPICS)}."}],
            "max_tokens": rng.randint(*tokens),
            "ignore_eos": True,
            "stream": streamed,
        }
        async with gate, session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
            text = await response.text()
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {text[:300]}")
            return str(response.headers["x-request-id"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        return list(await asyncio.gather(*(one(session, index) for index in range(count))))


def wait_rows(request_ids: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(DATA_DIR / "appliance.db") as connection:
            marks = ",".join("?" * len(request_ids))
            found = connection.execute(
                f"SELECT count(*) FROM usage_records WHERE request_id IN ({marks})",
                request_ids,
            ).fetchone()[0]
        if found == len(request_ids):
            return
        time.sleep(0.2)
    sys.exit("the usage rows of the phase did not land")


def move_back_one_day(request_ids: list[str]) -> None:
    marks = ",".join("?" * len(request_ids))
    with sqlite3.connect(DATA_DIR / "appliance.db") as connection:
        connection.execute(
            f"UPDATE usage_records SET created_at = datetime(created_at, '-1 day') WHERE request_id IN ({marks})",
            request_ids,
        )


def summary(request_ids: list[str]) -> str:
    marks = ",".join("?" * len(request_ids))
    with sqlite3.connect(DATA_DIR / "appliance.db") as connection:
        rows = connection.execute(
            f"SELECT completion_tokens, prompt_tokens, context_length FROM usage_records WHERE request_id IN ({marks})",
            request_ids,
        ).fetchall()
    completions = sorted(row[0] for row in rows)
    contexts = {row[2] for row in rows}
    return f"{len(rows)} requests, completion tokens median {completions[len(completions) // 2]}, context {contexts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="per phase (the drift test needs 30 per window)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--keep-up", action="store_true", help="leave the appliance running afterwards")
    args = parser.parse_args()
    env = environment()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    cli(env, "down")
    (DATA_DIR / "appliance.db").unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        (DATA_DIR / f"appliance.db{suffix}").unlink(missing_ok=True)
    (DATA_DIR / "audit" / "latest-checkpoint").unlink(missing_ok=True)
    started = time.monotonic()
    checked(env, "up", "--detach", "--timeout", "1500")
    print(f"appliance up in {time.monotonic() - started:.0f}s")
    try:
        status = json.loads(checked(env, "status", "--json"))
        url = status["gateway_url"]
        created = checked(
            env, "admin", "create-key", "--tenant", "bench", "--workflow", "wf-answers", "--agent", "writer", "--create"
        )
        key = json.loads(created)["key"]
        clock = time.monotonic()
        baseline = asyncio.run(phase(url, key, args.requests, (16, 32), args.concurrency, seed=1))
        wait_rows(baseline)
        print(f"baseline phase: {summary(baseline)} ({time.monotonic() - clock:.0f}s)")
        move_back_one_day(baseline)
        clock = time.monotonic()
        recent = asyncio.run(phase(url, key, args.requests, (32, 64), args.concurrency, seed=2))
        wait_rows(recent)
        print(f"recent phase:   {summary(recent)} ({time.monotonic() - clock:.0f}s)")
        time.sleep(65)  # the current minute's telemetry roll-up is written when the minute ends
        print("\n$ appliance drift report --window hour")
        print(checked(env, "drift", "report", "--window", "hour"), end="")
        report = json.loads(checked(env, "drift", "report", "--window", "hour", "--json"))
        for group in report["groups"]:
            if group["scope"] == "workflow":
                for comparison in group["comparisons"]:
                    if comparison["signal"] in ("completion_tokens", "context_utilisation"):
                        print(f"  [{group['id']}] {json.dumps(comparison)}")
        print("\n$ appliance placement report")
        print(checked(env, "placement", "report"), end="")
    finally:
        if not args.keep_up:
            cli(env, "down")


if __name__ == "__main__":
    main()

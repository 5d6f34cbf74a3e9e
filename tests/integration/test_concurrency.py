"""Concurrency governance against the real CPU engine: admission tiers keep short requests moving while
long ones queue, and the health signal goes from healthy to degrading under a real overload and back.

A gateway process of its own (tight tiers, a short telemetry window) sits in front of the session's
engines, so the appliance the other tests use keeps its defaults."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.integration.conftest import (
    CHAT_MODEL,
    TEST_DATA_DIR,
    Appliance,
    cli_output,
    gateway_env,
    start_gateway,
    stop_gateway,
)

pytestmark = pytest.mark.integration

PORT = 18093
LONG_TEXT = " ".join(f"Item {n} is a line of a long report about the harbour." for n in range(110))  # ~1,300 tokens


@dataclass
class Governed:
    url: str
    engine_url: str
    admin: dict[str, str]
    key: dict[str, str]


@pytest.fixture(scope="module")
def governed(appliance: Appliance) -> Iterator[Governed]:
    data_dir = TEST_DATA_DIR / "governed"
    env = gateway_env(
        appliance,
        data_dir,
        APPLIANCE_ADMISSION__LONG_PROMPT_TOKENS="256",
        APPLIANCE_ADMISSION__LONG_CONCURRENCY="1",
        APPLIANCE_ADMISSION__SHORT_CONCURRENCY="4",
        APPLIANCE_TELEMETRY__WINDOW_S="8",
        APPLIANCE_TELEMETRY__SCRAPE_INTERVAL_S="0.5",
    )

    admin = cli_output(env, "admin", "token", "--role", "admin").strip()
    created = cli_output(env, "admin", "create-key", "--tenant", "load", "--workflow", "mixed", "--create")
    key = json.loads(created)["key"]
    process = start_gateway(env, PORT, data_dir / "gateway.log")
    yield Governed(
        f"http://127.0.0.1:{PORT}",
        appliance.engine_url(CHAT_MODEL),
        {"Authorization": f"Bearer {admin}"},
        {"Authorization": f"Bearer {key}"},
    )
    stop_gateway(process)


async def _chat(session: aiohttp.ClientSession, url: str, headers: dict[str, str], text: str, tokens: int) -> float:
    """Seconds until the answer is complete."""
    started = time.monotonic()
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": tokens}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        await response.read()
    return time.monotonic() - started


async def _health(session: aiohttp.ClientSession, target: Governed) -> dict[str, object]:
    async with session.get(target.url + "/admin/health/concurrency", headers=target.admin) as response:
        assert response.status == 200, await response.text()
        report = await response.json()
    return dict(report["engines"][CHAT_MODEL])


async def test_a_long_request_cannot_starve_short_ones(governed: Governed) -> None:
    async with aiohttp.ClientSession() as session:
        longs = [
            asyncio.create_task(_chat(session, governed.url, governed.key, f"{n}. {LONG_TEXT}", 24)) for n in range(3)
        ]
        await asyncio.sleep(0.5)
        async with session.get(governed.url + "/metrics", headers=governed.admin) as response:
            metrics = await response.text()
        short = await _chat(session, governed.url, governed.key, "Say hi.", 4)
        long_times = await asyncio.gather(*longs)
    in_flight = f'appliance_admission_in_flight{{engine="{CHAT_MODEL}",tier="long"}} 1.0'
    waiting = f'appliance_admission_waiting{{engine="{CHAT_MODEL}",tier="long"}} 2.0'
    assert in_flight in metrics and waiting in metrics, "one long request in flight, two queued in their tier"
    assert short < max(long_times), "the short request did not wait for the long queue"


async def test_health_degrades_under_overload_and_recovers(governed: Governed) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(60):  # the previous test's load leaves the window first
            if (await _health(session, governed))["state"] == "healthy":
                break
            await asyncio.sleep(0.5)
        assert (await _health(session, governed))["state"] == "healthy"

        # Straight to the engine, past the gateway's tiers: a real overload (long prompts at 3/s).
        load: list[asyncio.Task[float]] = []
        seen: list[dict[str, object]] = []
        for n in range(30):
            load.append(asyncio.create_task(_chat(session, governed.engine_url, {}, f"Report {n}. {LONG_TEXT}", 16)))
            await asyncio.sleep(1 / 3)
            if n % 3 == 0:
                seen.append(await _health(session, governed))
        degraded = [h for h in seen if h["state"] != "healthy"]
        assert degraded, f"the signal never left healthy: {seen[-1]}"
        print(f"\noverload: {degraded[-1]['state']}: {degraded[-1]['reasons']}", file=sys.stderr)

        await asyncio.gather(*load)
        for _ in range(120):
            health = await _health(session, governed)
            if health["state"] == "healthy":
                break
            await asyncio.sleep(0.5)
        assert health["state"] == "healthy", health

    # The minutes of that overload are rolled up in the database, for the console's history charts.
    rows: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(70):
            async with session.get(governed.url + "/admin/health/history", headers=governed.admin) as response:
                assert response.status == 200, await response.text()
                rows = [r for r in (await response.json())["data"] if r["engine"] == CHAT_MODEL]
            if any(r["state"] != "healthy" for r in rows):
                break
            await asyncio.sleep(1)
    assert any(r["state"] != "healthy" and float(str(r["waiting_max"])) > 0 for r in rows), rows
    assert sum(int(str(r["prompt_tokens"])) for r in rows) > 0

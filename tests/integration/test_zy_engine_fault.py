"""A real vLLM engine killed mid-stream (issue 21, item 2): the client gets a clean error event, the reservation
settles to what was generated, and the usage row and the audit record exist. Runs near the end: the chat engine
is restarted by the supervisor, and the test waits for it before the next ones."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import CHAT_MODEL, Appliance

pytestmark = pytest.mark.integration


def audit_record(appliance: Appliance, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
    sql = "SELECT * FROM audit_records WHERE request_id = ? AND event_type LIKE 'inference.%'"
    return appliance.rows(sql, request_id, timeout=timeout)[0]


async def budget_of(session: aiohttp.ClientSession, appliance: Appliance, workflow_id: str) -> dict[str, Any]:
    async with session.get(appliance.gateway_url + "/admin/budgets/") as response:
        rows = [r for r in (await response.json())["data"] if r["scope_id"] == workflow_id]
    assert len(rows) == 1
    return dict(rows[0])


async def test_an_engine_killed_mid_stream_ends_the_stream_cleanly_and_keeps_exact_books(
    appliance: Appliance,
) -> None:
    created = json.loads(
        appliance.cli("admin", "create-key", "--tenant", "faults", "--workflow", "killed", "--create").stdout
    )
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    admin_headers = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession(headers=admin_headers) as session:
        body = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "period": "day"}
        async with session.post(appliance.gateway_url + "/admin/budgets/", json={**body, "limit": 100_000}) as r:
            assert r.status == 201, await r.text()

    engine = next(e for e in appliance.status()["engines"] if e["model"] == CHAT_MODEL)
    restarts = engine["restarts"]
    engine_log = appliance.data_dir / "logs" / f"engine-{CHAT_MODEL}.log"
    logged = engine_log.stat().st_size  # the log is appended to: what the restart writes comes after this
    request = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    payloads: list[str] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {created['key']}"}) as session:
        async with session.post(appliance.gateway_url + "/v1/chat/completions", json=request) as response:
            assert response.status == 200
            request_id = response.headers["x-request-id"]
            async for line in response.content:
                if not line.startswith(b"data:"):
                    continue
                payloads.append(line[5:].strip().decode())
                if len(payloads) == 12:
                    os.killpg(engine["pid"], signal.SIGKILL)  # the engine and its engine-core child, at once
    # The stream ended (no hang) with one error event in the OpenAI envelope, and no [DONE].
    assert len(payloads) >= 12 and "[DONE]" not in payloads
    error = json.loads(payloads[-1])
    assert error["error"]["type"] == "upstream_error" and "broke off" in error["error"]["message"]
    assert all("error" not in json.loads(p) for p in payloads[:-1])

    row = appliance.usage_row(request_id)
    assert (row["status_code"], row["error_code"], row["streamed"]) == (502, "engine_error", 1)
    # What was generated before the kill, as the engine counted it: more than the 11 content events read, far
    # less than the 4000 asked for.
    assert 11 <= row["completion_tokens"] < 4000 and row["prompt_tokens"] > 0

    settled = (row["prompt_tokens"] + row["completion_tokens"], 0)  # (used, reserved)
    async with aiohttp.ClientSession(headers=admin_headers) as session:
        deadline = time.monotonic() + 15
        while True:  # spending is committed off the answer's path
            budget = await budget_of(session, appliance, created["workflow_id"])
            if (budget["used"], budget["reserved"]) == settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    assert (budget["used"], budget["reserved"]) == settled

    record = audit_record(appliance, request_id)
    assert record["outcome"] == "failure" and record["tenant_id"] == created["tenant_id"]
    assert json.loads(record["detail"])["completion_tokens"] == row["completion_tokens"]

    # The supervisor restarts the engine; the next tests find it serving again.
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        engine = next(e for e in appliance.status()["engines"] if e["model"] == CHAT_MODEL)
        if engine["healthy"] and engine["restarts"] > restarts:
            break
        await asyncio.sleep(2)
    assert engine["healthy"] and engine["restarts"] == restarts + 1
    # The restart read the compiled model back from the compile cache (vLLM's AOT artifact fails to load with this
    # torch, and the engine then compiles again: a minute of every start; see engine_env).
    with engine_log.open("rb") as log:
        log.seek(logged)
        restart = log.read().decode(errors="replace")
    assert "init engine" in restart and "Compiling model again due to a load failure" not in restart

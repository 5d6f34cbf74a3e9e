"""A client that goes away mid-stream: the engine stops generating and the tokens so far are recorded."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from tests.integration.conftest import CHAT_MODEL, Appliance

pytestmark = pytest.mark.integration


async def running_requests(session: aiohttp.ClientSession, engine_url: str) -> float:
    async with session.get(engine_url + "/metrics") as response:
        text = await response.text()
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", text, re.MULTILINE)
    assert match, "the engine exposes vllm:num_requests_running"
    return float(match.group(1))


async def test_disconnect_mid_stream_aborts_the_engine_and_records_usage(appliance: Appliance) -> None:
    engine = appliance.engine_url(CHAT_MODEL)
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession(headers=appliance.auth) as session:
        response = await session.post(appliance.gateway_url + "/v1/chat/completions", json=body)
        request_id = response.headers["x-request-id"]
        events = 0
        async for line in response.content:
            events += line.startswith(b"data:")
            if events >= 12:
                break
        assert await running_requests(session, engine) == 1
        response.close()  # the client goes away

        for _ in range(100):
            if await running_requests(session, engine) == 0:
                break
            await asyncio.sleep(0.1)
        assert await running_requests(session, engine) == 0, "the engine kept generating for nobody"

    row = appliance.usage_row(request_id)
    assert row["client_disconnected"] and row["streamed"]
    # 12 events were read (the first carries only the role); generation stopped long before max_tokens.
    assert 11 <= row["completion_tokens"] < 4000
    assert row["prompt_tokens"] > 0 and row["ttft_ms"] is not None

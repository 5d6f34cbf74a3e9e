"""Budgets against the real engine: the prompt is counted with the model's own tokenizer (chat template
included), max_tokens is clamped, usage settles to exactly what the engine reported."""

from __future__ import annotations

import json

import aiohttp
import pytest
from openai import OpenAI, RateLimitError

from tests.integration.conftest import CHAT_MODEL, Appliance

pytestmark = pytest.mark.integration


async def test_clamp_settle_and_refuse_with_the_real_engine(appliance: Appliance) -> None:
    created = json.loads(
        appliance.cli("admin", "create-key", "--tenant", "budgeted", "--workflow", "tight", "--create").stdout
    )
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
        body = {
            "scope_type": "workflow",
            "scope_id": created["workflow_id"],
            "kind": "tokens",
            "period": "day",
            "limit": 60,
        }
        async with session.post(appliance.gateway_url + "/admin/budgets/", json=body) as response:
            assert response.status == 201

    client = OpenAI(base_url=appliance.gateway_url + "/v1", api_key=created["key"], max_retries=0)
    messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=messages, extra_body={"ignore_eos": True}
    )
    completion = raw.parse()
    assert completion.usage is not None
    prompt = completion.usage.prompt_tokens
    clamp = int(raw.headers["x-budget-max-tokens"])
    assert clamp == 60 - prompt, "prompt counted exactly as the engine counts it"
    assert completion.usage.completion_tokens == clamp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
        async with session.get(appliance.gateway_url + "/admin/budgets/") as response:
            rows = [r for r in (await response.json())["data"] if r["scope_id"] == created["workflow_id"]]
    assert [(r["used"], r["reserved"], r["remaining"]) for r in rows] == [(60, 0, 0)]
    with pytest.raises(RateLimitError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=4)
    assert info.value.response.json()["error"]["type"] == "budget_exceeded"


async def test_retries_and_loop_depth_with_the_real_engine(appliance: Appliance) -> None:
    created = json.loads(
        appliance.cli("admin", "create-key", "--tenant", "agents", "--workflow", "planner", "--create").stdout
    )
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
        for kind, limit in (("max_retries", 1), ("max_depth", 1)):
            body = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": kind, "period": "none"}
            async with session.post(appliance.gateway_url + "/admin/budgets/", json={**body, "limit": limit}) as r:
                assert r.status == 201, await r.text()

    client = OpenAI(base_url=appliance.gateway_url + "/v1", api_key=created["key"], max_retries=0)
    messages = [{"role": "user", "content": "Next step?"}]

    def call(**headers: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=messages, max_tokens=2, extra_headers=headers
        )
        return str(raw.headers["x-request-id"])

    call(**{"Idempotency-Key": "step-1"})
    call(**{"Idempotency-Key": "step-1"})  # the one retry allowed
    with pytest.raises(RateLimitError) as retried:
        call(**{"Idempotency-Key": "step-1"})
    assert retried.value.response.json()["error"]["code"] == "retry_limit_exceeded"

    root = call()
    child = call(**{"X-Parent-Request-Id": root})  # depth 1
    with pytest.raises(RateLimitError) as deep:
        call(**{"X-Parent-Request-Id": child})  # depth 2: past the limit, whatever the client says
    assert deep.value.response.json()["error"]["code"] == "loop_depth_exceeded"
    assert (appliance.usage_row(child)["depth"], appliance.usage_row(root)["depth"]) == (1, 0)

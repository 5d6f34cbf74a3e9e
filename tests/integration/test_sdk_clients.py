"""The official openai SDK's async client and its helpers against the gateway and the real engines (the sync client
is driven by test_openai_api.py and test_tools.py): what application code written for OpenAI does unchanged."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI, RateLimitError

from tests.integration.conftest import CHAT_MODEL, EMBED_MODEL, Appliance

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
async def async_client(appliance: Appliance) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=appliance.gateway_url + "/v1", api_key=appliance.api_key, max_retries=0, timeout=120)


async def test_async_models_chat_completions_and_embeddings(async_client: AsyncOpenAI) -> None:
    assert {model.id async for model in async_client.models.list()} == {CHAT_MODEL, EMBED_MODEL}
    assert (await async_client.models.retrieve(CHAT_MODEL)).id == CHAT_MODEL
    chat = await async_client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in (chat.choices[0].message.content or "")
    completion = await async_client.completions.create(model=CHAT_MODEL, prompt="Paris is", max_tokens=5)
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    embeddings = await async_client.embeddings.create(model=EMBED_MODEL, input=["one", "two"])
    assert [len(item.embedding) for item in embeddings.data] == [384, 384]
    await async_client.close()


async def test_async_stream_and_stream_helper_give_the_same_answer(async_client: AsyncOpenAI) -> None:
    stream = await async_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for chunk in stream:
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens > 0
    async with async_client.chat.completions.stream(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0
    ) as helper:
        deltas = [event.delta async for event in helper if event.type == "content.delta"]
        final = await helper.get_final_completion()
    assert "".join(deltas) == "".join(pieces) == final.choices[0].message.content
    await async_client.close()


def test_the_sdk_does_not_retry_a_budget_refusal(appliance: Appliance) -> None:
    """A budget refusal says `x-should-retry: false`; the SDK, retries enabled, sends the request once."""
    created = json.loads(
        appliance.cli(
            "admin", "create-key", "--tenant", f"sdk-{uuid.uuid4().hex[:8]}", "--workflow", "w", "--create"
        ).stdout
    )
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    budget = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "period": "day"}
    answer = httpx.post(
        appliance.gateway_url + "/admin/budgets/",
        json={**budget, "limit": 5},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert answer.status_code == 201
    sent: list[str] = []
    http = httpx.Client(
        event_hooks={"request": [lambda request: sent.append(request.headers["x-stainless-retry-count"])]}
    )
    client = OpenAI(
        base_url=appliance.gateway_url + "/v1", api_key=created["key"], max_retries=3, http_client=http, timeout=60
    )
    with pytest.raises(RateLimitError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=QUESTION, max_tokens=4)
    assert info.value.response.headers["x-should-retry"] == "false"
    assert sent == ["0"]

"""Budgets bound what the engine generates for every request shape the SDK can send. The fake engine plays
vLLM's part (``n`` choices per prompt, the one cap it obeys, ``ignore_eos`` generating the whole cap: the worst
case); tests/integration/test_budget_shapes.py does the same against the real engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import Settings
from tests.support import fake_engine as fake
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import Client, admin_headers, fake_settings, tenant_with_key

WORDS = "one two three four five"  # 5 tokens for the fake; 8 as a chat message


@pytest.fixture
async def world(
    tmp_path: Path, fake_engine: FakeEngine
) -> AsyncIterator[tuple[Client, dict[str, str], dict[str, Any]]]:
    settings: Settings = fake_settings(tmp_path, fake_engine)
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        yield client, admin, await tenant_with_key(client, admin, "acme")


async def budget(client: Client, admin: dict[str, str], scope: dict[str, Any], scope_type: str, **body: Any) -> None:
    response = await client.post(
        "/admin/budgets/", json={"scope_type": scope_type, "scope_id": scope["id"], **body}, headers=admin
    )
    assert response.status_code == 201, response.text


async def used(client: Client, admin: dict[str, str]) -> list[tuple[int, int]]:
    rows = (await client.get("/admin/budgets/", headers=admin)).json()["data"]
    return [(row.get("used", 0), row.get("reserved", 0)) for row in rows if row["kind"] == "tokens"]


def tokens_of(response: Any) -> int:
    return int(response.json()["usage"]["total_tokens"])


async def test_max_completion_tokens_beside_a_small_max_tokens_is_capped_by_a_per_request_budget(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["workflow"], "workflow", kind="max_tokens", period="none", limit=40)
    body = {"model": "fake", "messages": [{"role": "user", "content": WORDS}], "ignore_eos": True}
    response = await client.post(
        "/v1/chat/completions", json={**body, "max_tokens": 1, "max_completion_tokens": 300}, headers=ids["headers"]
    )
    assert response.status_code == 200, response.text
    served = fake.COMPLETIONS_SERVED[-1]
    assert served["max_completion_tokens"] == 40 and "max_tokens" not in served
    assert response.json()["usage"]["completion_tokens"] == 40


async def test_n_choices_are_all_reserved_and_stay_within_the_budget(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["tenant"], "tenant", kind="tokens", period="day", limit=300)
    body = {"model": "fake", "messages": [{"role": "user", "content": WORDS}], "n": 8, "max_tokens": 100}
    response = await client.post("/v1/chat/completions", json={**body, "ignore_eos": True}, headers=ids["headers"])
    assert response.status_code == 200, response.text
    assert response.headers["x-budget-max-tokens"] == str((300 - 8) // 8)  # per choice
    assert fake.COMPLETIONS_SERVED[-1]["max_completion_tokens"] == 36
    spent = tokens_of(response)
    assert spent <= 300 and await used(client, admin) == [(spent, 0)]
    again = await client.post("/v1/chat/completions", json=body, headers=ids["headers"])
    assert again.status_code == 429 and again.headers["retry-after"]


async def test_a_list_of_prompts_is_reserved_per_prompt(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["tenant"], "tenant", kind="tokens", period="day", limit=300)
    body = {"model": "fake", "prompt": [WORDS] * 16, "max_tokens": 64, "ignore_eos": True}
    response = await client.post("/v1/completions", json=body, headers=ids["headers"])
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 16
    spent = tokens_of(response)
    assert spent <= 300 and await used(client, admin) == [(spent, 0)]


async def test_more_sequences_than_the_budget_leaves_tokens_for_are_refused(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["tenant"], "tenant", kind="tokens", period="day", limit=100)
    body = {"model": "fake", "prompt": [WORDS] * 16, "n": 2}  # 80 prompt tokens, 32 sequences: not one token each
    response = await client.post("/v1/completions", json=body, headers=ids["headers"])
    assert response.status_code == 429
    assert await used(client, admin) == [(0, 0)]


async def test_a_field_of_another_endpoint_is_refused_not_counted(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["tenant"], "tenant", kind="tokens", period="day", limit=300)
    served = len(fake.COMPLETIONS_SERVED)
    body = {"model": "fake", "prompt": " ".join(["long"] * 900), "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/completions", json=body, headers=ids["headers"])
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert len(fake.COMPLETIONS_SERVED) == served and await used(client, admin) == [(0, 0)]


async def test_a_request_without_a_cap_gets_the_default_not_the_whole_budget(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["tenant"], "tenant", kind="tokens", period="day", limit=1_000_000)
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": WORDS}]},
        headers=ids["headers"],
    )
    assert response.status_code == 200
    assert fake.COMPLETIONS_SERVED[-1]["max_completion_tokens"] == 1024
    assert "x-budget-max-tokens" not in response.headers  # the default fits: nothing was clamped


async def test_a_streamed_n_answer_is_charged_every_choice(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["tenant"], "tenant", kind="tokens", period="day", limit=1000)
    body = {
        "model": "fake",
        "messages": [{"role": "user", "content": WORDS}],
        "n": 4,
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post("/v1/chat/completions", json=body, headers=ids["headers"])
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    final = json.loads(events[-2])
    assert final["usage"]["completion_tokens"] == 4 * 6
    assert await used(client, admin) == [(final["usage"]["total_tokens"], 0)]


async def test_concurrent_shapes_never_spend_past_the_budget_and_books_agree(world: Any) -> None:
    client, admin, ids = world
    await budget(client, admin, ids["workflow"], "workflow", kind="tokens", period="hour", limit=600)
    shapes = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": WORDS}], "n": 3}),
        ("/v1/completions", {"prompt": [WORDS, WORDS]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": WORDS}], "max_completion_tokens": 50}),
        ("/v1/completions", {"prompt": [1, 2, 3, 4], "n": 2, "max_tokens": 30}),
    ]

    async def one(index: int) -> Any:
        path, body = shapes[index % len(shapes)]
        return await client.post(path, json={"model": "fake", "ignore_eos": True, **body}, headers=ids["headers"])

    responses = await asyncio.gather(*(one(i) for i in range(40)))
    assert {r.status_code for r in responses} <= {200, 429}
    spent = sum(tokens_of(r) for r in responses if r.status_code == 200)
    assert 0 < spent <= 600
    assert await used(client, admin) == [(spent, 0)], "the budget records exactly what the engine reported"

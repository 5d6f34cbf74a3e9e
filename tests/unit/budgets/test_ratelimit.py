"""Per-minute limits with OpenAI's `x-ratelimit-*` headers, and refusals the openai SDK understands: it retries
a 429 by itself unless `x-should-retry: false` (or a `Retry-After` over 60 s) says waiting cannot help."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.budgets.ratelimit import ratelimit_headers, reset_duration
from appliance.budgets.store import BudgetExceededError, BudgetStore, CallLink
from appliance.settings import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import Client, admin_headers, fake_settings, tenant_with_key
from tests.unit.budgets.conftest import CHAIN, Clock, add_budget

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "one two three four five"}]}  # 8 tokens here


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.0121, "13ms"), (0.85, "850ms"), (12, "12s"), (59.5, "59.5s"), (60, "1m0s"), (3725, "1h2m5s")],
)
def test_resets_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert reset_duration(seconds) == text


def test_the_grant_carries_the_tightest_minute_budget_of_each_kind(store: BudgetStore, clock: Clock) -> None:
    clock.moment += timedelta(seconds=48)  # 12 s before the minute ends
    add_budget(store, "workflow", "wf_1", "tokens", "minute", 500)
    add_budget(store, "tenant", "ten_1", "tokens", "minute", 200)
    add_budget(store, "api_key", "key_1", "requests", "minute", 3)
    add_budget(store, "tenant", "ten_1", "tokens", "day", 100_000)  # not a rate limit: no header
    grant = store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    assert ratelimit_headers(grant) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "12s",
        "x-ratelimit-limit-tokens": "200",
        "x-ratelimit-remaining-tokens": "150",
        "x-ratelimit-reset-tokens": "12s",
    }


def test_no_minute_budget_no_headers(store: BudgetStore) -> None:
    add_budget(store, "tenant", "ten_1", "tokens", "hour", 1000)
    assert ratelimit_headers(store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)) == {}


def test_a_minute_refusal_says_waiting_helps(store: BudgetStore, clock: Clock) -> None:
    clock.moment += timedelta(seconds=20)
    add_budget(store, "api_key", "key_1", "requests", "minute", 1)
    store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    with pytest.raises(BudgetExceededError) as info:
        store.reserve("r2", CHAIN, prompt_tokens=10, max_tokens=40)
    assert info.value.headers == {
        "Retry-After": "40",
        "x-should-retry": "true",
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "40s",
    }
    clock.moment += timedelta(seconds=40)  # the next minute
    assert store.reserve("r3", CHAIN, prompt_tokens=10, max_tokens=40).reserved


def test_a_prompt_larger_than_a_whole_minute_is_not_worth_a_retry(store: BudgetStore) -> None:
    add_budget(store, "tenant", "ten_1", "tokens", "minute", 100)
    with pytest.raises(BudgetExceededError) as info:
        store.reserve("r1", CHAIN, prompt_tokens=100, max_tokens=10)
    assert info.value.headers["x-should-retry"] == "false"
    assert info.value.headers["x-ratelimit-remaining-tokens"] == "100"


@pytest.mark.parametrize("period", ["hour", "day", "month"])
def test_a_budget_refusal_says_waiting_does_not_help(store: BudgetStore, period: str) -> None:
    add_budget(store, "tenant", "ten_1", "tokens", period, 30)
    with pytest.raises(BudgetExceededError) as info:
        store.reserve("r1", CHAIN, prompt_tokens=40, max_tokens=10)
    assert info.value.headers["x-should-retry"] == "false" and int(info.value.headers["Retry-After"]) > 60


def test_a_retry_limit_refusal_says_waiting_does_not_help(store: BudgetStore) -> None:
    add_budget(store, "workflow", "wf_1", "max_retries", "none", 0)
    store.admit("r1", CHAIN, CallLink(idempotency_key="order-42"))
    with pytest.raises(BudgetExceededError) as info:
        store.admit("r2", CHAIN, CallLink(idempotency_key="order-42"))
    assert info.value.headers["x-should-retry"] == "false" and int(info.value.headers["Retry-After"]) > 60


def test_a_depth_limit_refusal_says_waiting_does_not_help(store: BudgetStore) -> None:
    add_budget(store, "workflow", "wf_1", "max_depth", "none", 0)
    store.admit("r1", CHAIN, CallLink(idempotency_key="root"))
    with pytest.raises(BudgetExceededError) as info:
        store.admit("r2", CHAIN, CallLink(parent_request_id="r1"))
    assert info.value.headers["x-should-retry"] == "false" and int(info.value.headers["Retry-After"]) > 60


@pytest.fixture
async def world(tmp_path: Path, fake_engine: FakeEngine) -> AsyncIterator[tuple[Client, dict[str, str], Any]]:
    settings: Settings = fake_settings(tmp_path, fake_engine)
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        yield client, admin, await tenant_with_key(client, admin, "acme")


async def limit(client: Client, admin: dict[str, str], scope: str, ident: str, kind: str, period: str, n: int) -> None:
    body = {"scope_type": scope, "scope_id": ident, "kind": kind, "period": period, "limit": n}
    response = await client.post("/admin/budgets/", json=body, headers=admin)
    assert response.status_code == 201, response.text


async def test_the_gateway_sends_rate_limit_headers_and_refuses_past_the_minute(world: Any) -> None:
    client, admin, ids = world
    await limit(client, admin, "api_key", ids["key"]["id"], "requests", "minute", 2)
    await limit(client, admin, "workflow", ids["workflow"]["id"], "tokens", "minute", 1000)
    first = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20}, headers=ids["headers"])
    assert first.status_code == 200, first.text
    assert (first.headers["x-ratelimit-limit-requests"], first.headers["x-ratelimit-remaining-requests"]) == ("2", "1")
    assert (first.headers["x-ratelimit-limit-tokens"], first.headers["x-ratelimit-remaining-tokens"]) == ("1000", "972")
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    stream = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=ids["headers"])
    assert stream.status_code == 200 and stream.headers["x-ratelimit-remaining-requests"] == "0"
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=ids["headers"])
    assert refused.status_code == 429 and refused.headers["x-should-retry"] == "true"
    assert 1 <= int(refused.headers["retry-after"]) <= 60 and refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_the_gateway_tells_the_sdk_not_to_retry_a_spent_daily_budget(world: Any) -> None:
    client, admin, ids = world
    await limit(client, admin, "tenant", ids["tenant"]["id"], "tokens", "day", 5)
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=ids["headers"])
    assert refused.status_code == 429 and refused.headers["x-should-retry"] == "false"
    assert int(refused.headers["retry-after"]) > 0 and "x-ratelimit-limit-tokens" not in refused.headers

"""Retries and loop depth: counted and limited by the gateway from its own records."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import Client, admin_headers, fake_settings, tenant_with_key

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "plan the next step"}]}


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return fake_settings(tmp_path, fake_engine)


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[tuple[Client, dict[str, str], dict[str, str], dict[str, Any]]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        keys = {name: (await tenant_with_key(client, admin, name))["key"] for name in ("acme", "globex")}
        yield client, admin, {"Authorization": f"Bearer {keys['acme']['key']}"}, keys


async def per_call_limit(
    client: Client, admin: dict[str, str], scope_type: str, scope_id: str, kind: str, limit: int
) -> None:
    """A per-call budget (period `none`): max_depth or max_retries."""
    body = {"scope_type": scope_type, "scope_id": scope_id, "kind": kind, "period": "none", "limit": limit}
    response = await client.post("/admin/budgets/", headers=admin, json=body)
    assert response.status_code == 201, response.text


async def ask(client: Client, key: dict[str, str], **headers: str) -> Any:
    return await client.post("/v1/chat/completions", json=CHAT, headers={**key, **headers})


async def usage(settings: Settings, request_id: str) -> tuple[int, int]:
    for _ in range(100):
        row = (
            sqlite3.connect(Path(settings.data_dir) / "appliance.db")
            .execute("SELECT retry_attempt, depth FROM usage_records WHERE request_id = ?", (request_id,))
            .fetchone()
        )
        if row:
            return int(row[0]), int(row[1])
        await asyncio.sleep(0.05)
    raise AssertionError("no usage row")


async def test_depth_comes_from_the_parents_record_and_is_limited(world: Any, settings: Settings) -> None:
    client, admin, key, keys = world
    await per_call_limit(client, admin, "workflow", keys["acme"]["workflow_id"], "max_depth", 1)
    root = await ask(client, key)
    child = await ask(client, key, **{"X-Parent-Request-Id": root.headers["x-request-id"]})
    assert child.status_code == 200
    assert await usage(settings, root.headers["x-request-id"]) == (0, 0)
    assert await usage(settings, child.headers["x-request-id"]) == (0, 1)
    grandchild = await ask(client, key, **{"X-Parent-Request-Id": child.headers["x-request-id"]})
    assert grandchild.status_code == 429
    assert grandchild.json()["error"]["code"] == "loop_depth_exceeded"


async def test_an_unknown_parent_counts_as_a_root_until_depth_is_limited(world: Any, settings: Settings) -> None:
    client, admin, key, keys = world
    untracked = await ask(client, key, **{"X-Parent-Request-Id": "req_never_recorded"})
    assert untracked.status_code == 200
    assert await usage(settings, untracked.headers["x-request-id"]) == (0, 1)
    await per_call_limit(client, admin, "tenant", keys["acme"]["tenant_id"], "max_depth", 5)
    unknown = await ask(client, key, **{"X-Parent-Request-Id": "req_made_up"})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_parent_request"
    foreign = await client.post(
        "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {keys['globex']['key']}"}
    )
    across = await ask(client, key, **{"X-Parent-Request-Id": foreign.headers["x-request-id"]})
    assert across.status_code == 400, "another tenant's request is no parent of ours"


async def test_retries_are_counted_per_logical_call_and_limited(world: Any, settings: Settings) -> None:
    client, admin, key, keys = world
    await per_call_limit(client, admin, "workflow", keys["acme"]["workflow_id"], "max_retries", 1)
    first = await ask(client, key, **{"Idempotency-Key": "order-42"})
    retry = await ask(client, key, **{"X-Retry-Of": first.headers["x-request-id"]})
    assert (first.status_code, retry.status_code) == (200, 200)
    assert await usage(settings, retry.headers["x-request-id"]) == (1, 0)
    again = await ask(client, key, **{"Idempotency-Key": "order-42"})
    assert again.status_code == 429 and again.json()["error"]["code"] == "retry_limit_exceeded"
    other = await ask(client, key, **{"Idempotency-Key": "order-43"})
    assert other.status_code == 200


async def test_malformed_call_headers_are_refused(world: Any) -> None:
    client, _admin, key, _keys = world
    response = await ask(client, key, **{"Idempotency-Key": "x" * 201})
    assert response.status_code == 400 and response.json()["error"]["param"] == "idempotency-key"


async def test_the_sdks_own_retries_count_as_retries(world: Any, settings: Settings) -> None:
    """The openai SDK retries with the same body and `x-stainless-retry-count: n`, but no idempotency key."""
    client, admin, key, keys = world
    await per_call_limit(client, admin, "workflow", keys["acme"]["workflow_id"], "max_retries", 1)
    first = await ask(client, key, **{"x-stainless-retry-count": "0"})
    retry = await ask(client, key, **{"x-stainless-retry-count": "1"})
    assert (first.status_code, retry.status_code) == (200, 200)
    assert await usage(settings, first.headers["x-request-id"]) == (0, 0)
    assert await usage(settings, retry.headers["x-request-id"]) == (1, 0)
    second_retry = await ask(client, key, **{"x-stainless-retry-count": "2"})
    assert second_retry.status_code == 429 and second_retry.json()["error"]["code"] == "retry_limit_exceeded"


async def test_the_clients_retry_count_never_lowers_the_gateways(world: Any, settings: Settings) -> None:
    client, admin, key, keys = world
    await per_call_limit(client, admin, "workflow", keys["acme"]["workflow_id"], "max_retries", 1)
    for _ in range(2):
        assert (await ask(client, key, **{"Idempotency-Key": "order-7"})).status_code == 200
    claimed_first = await ask(client, key, **{"Idempotency-Key": "order-7", "x-stainless-retry-count": "0"})
    assert claimed_first.status_code == 429 and claimed_first.json()["error"]["code"] == "retry_limit_exceeded"
    higher = await ask(client, key, **{"Idempotency-Key": "order-8", "x-stainless-retry-count": "1"})
    assert higher.status_code == 200 and await usage(settings, higher.headers["x-request-id"]) == (1, 0)


async def test_sdk_retries_are_recorded_without_a_retry_budget(world: Any, settings: Settings) -> None:
    client, _admin, key, _keys = world
    retry = await ask(client, key, **{"x-stainless-retry-count": "3"})
    assert retry.status_code == 200 and await usage(settings, retry.headers["x-request-id"]) == (3, 0)


async def test_a_malformed_sdk_retry_count_is_refused(world: Any) -> None:
    client, _admin, key, _keys = world
    for value in ("-1", "one", "99999"):
        response = await ask(client, key, **{"x-stainless-retry-count": value})
        assert response.status_code == 400 and response.json()["error"]["param"] == "x-stainless-retry-count"

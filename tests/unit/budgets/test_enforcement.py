"""Budgets enforced by the gateway before generation (the fake engine stands in for vLLM here; the
integration tests do the same against the real engine)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support import fake_engine as fake
from tests.support.fake_engine import FakeEngine

Client = AsyncTestClient[Any]
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "one two three four five"}]}  # 8 tokens here


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return Settings(data_dir=tmp_path, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)]))


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[tuple[Client, dict[str, str], dict[str, Any]]]:
    """A client, admin headers, and a workflow with an inference key."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        token = embedded_issuer(settings).mint("root", client_id="c", roles=["admin"])
        admin = {"Authorization": f"Bearer {token}"}
        tenant = (await client.post("/admin/tenants", json={"name": "acme"}, headers=admin)).json()
        workflow = (
            await client.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin)
        ).json()
        key = (await client.post("/admin/api-keys", json={"workflow_id": workflow["id"]}, headers=admin)).json()
        yield client, admin, {"tenant": tenant, "workflow": workflow, "key": key}


async def budget(client: Client, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post("/admin/budgets/", json=body, headers=admin)
    assert response.status_code == 201, response.text
    return dict(response.json())


def as_key(ids: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {ids['key']['key']}"}


async def test_without_budgets_nothing_is_clamped(world: Any) -> None:
    client, _admin, ids = world
    response = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert response.status_code == 200 and "x-budget-max-tokens" not in response.headers


async def test_max_tokens_is_clamped_to_the_budget_then_usage_settles(world: Any) -> None:
    client, admin, ids = world
    await budget(
        client, admin, scope_type="workflow", scope_id=ids["workflow"]["id"], kind="tokens", period="hour", limit=50
    )
    response = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert response.status_code == 200
    assert response.headers["x-budget-max-tokens"] == "42"  # 50 - the 8 prompt tokens
    assert fake.COMPLETIONS_SERVED[-1]["max_tokens"] == 42
    [row] = (await client.get("/admin/budgets/", headers=admin)).json()["data"]
    assert (row["used"], row["reserved"], row["remaining"]) == (9, 0, 41)  # the engine reported 5 + 4


async def test_refused_with_429_before_the_engine_is_called(world: Any) -> None:
    client, admin, ids = world
    made = await budget(
        client, admin, scope_type="tenant", scope_id=ids["tenant"]["id"], kind="tokens", period="day", limit=10
    )
    served = len(fake.COMPLETIONS_SERVED)
    first = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert first.status_code == 200 and first.headers["x-budget-max-tokens"] == "2"
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("budget_exceeded", "budget_exceeded", made["id"])
    assert "1 tokens remain of 10" in error["message"] and int(refused.headers["retry-after"]) > 0
    assert len(fake.COMPLETIONS_SERVED) == served + 1, "the refused request never reached the engine"


async def test_call_budget_and_streams(world: Any) -> None:
    client, admin, ids = world
    await budget(
        client, admin, scope_type="api_key", scope_id=ids["key"]["id"], kind="requests", period="hour", limit=2
    )
    for stream in (True, False):
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=as_key(ids))
        assert response.status_code == 200
    assert (await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))).status_code == 429
    [row] = (await client.get("/admin/budgets/", headers=admin)).json()["data"]
    assert (row["used"], row["reserved"]) == (2, 0)


async def test_fails_closed_when_budgets_cannot_be_evaluated(world: Any, settings: Settings) -> None:
    client, admin, ids = world
    await budget(
        client, admin, scope_type="tenant", scope_id=ids["tenant"]["id"], kind="tokens", period="day", limit=1000
    )
    sqlite3.connect(Path(settings.data_dir) / "appliance.db").execute("DROP TABLE budget_counters")  # a broken store
    served = len(fake.COMPLETIONS_SERVED)
    response = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert response.status_code == 503 and response.json()["error"]["code"] == "budget_unavailable"
    assert len(fake.COMPLETIONS_SERVED) == served


async def test_budget_admin_rules(world: Any, settings: Settings) -> None:
    client, admin, ids = world
    bad = await client.post(
        "/admin/budgets/",
        json={
            "scope_type": "tenant",
            "scope_id": ids["tenant"]["id"],
            "kind": "max_tokens",
            "period": "day",
            "limit": 5,
        },
        headers=admin,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "period"
    other = embedded_issuer(settings).mint("x", client_id="c", roles=["admin"], tenant_id="ten_other")
    foreign = await client.post(
        "/admin/budgets/",
        json={"scope_type": "workflow", "scope_id": ids["workflow"]["id"], "kind": "tokens", "limit": 5},
        headers={"Authorization": f"Bearer {other}"},
    )
    assert foreign.status_code == 404
    user = embedded_issuer(settings).mint("u", client_id="c", roles=["user"])
    assert (await client.get("/admin/budgets/", headers={"Authorization": f"Bearer {user}"})).status_code == 403

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
from appliance.settings import ModelPrice, PricingSettings, Settings
from tests.support import fake_engine as fake
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import Client, admin_headers, fake_settings, tenant_with_key

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "one two three four five"}]}  # 8 tokens here


PRICE = ModelPrice(prompt_per_million=1000.0, completion_per_million=2000.0)  # 0.001 and 0.002 per token


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return fake_settings(tmp_path, fake_engine, pricing=PricingSettings(models={"fake": PRICE}))


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[tuple[Client, dict[str, str], dict[str, Any]]]:
    """A client, admin headers, and a workflow with an inference key."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        yield client, admin, await tenant_with_key(client, admin, "acme")


async def budget(client: Client, admin: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post("/admin/budgets/", json=body, headers=admin)
    assert response.status_code == 201, response.text
    return dict(response.json())


def as_key(ids: dict[str, Any]) -> dict[str, str]:
    return dict(ids["headers"])


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
    served = fake.COMPLETIONS_SERVED[-1]
    assert served["max_completion_tokens"] == 42 and "max_tokens" not in served  # the one cap vLLM obeys
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
    assert "3 tokens remain of 10" in error["message"] and int(refused.headers["retry-after"]) > 0
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
    other_tenant = (await client.post("/admin/tenants", json={"name": "other"}, headers=admin)).json()["id"]
    other = embedded_issuer(settings).mint("x", client_id="c", roles=["admin"], tenant_id=other_tenant)
    foreign = await client.post(
        "/admin/budgets/",
        json={"scope_type": "workflow", "scope_id": ids["workflow"]["id"], "kind": "tokens", "limit": 5},
        headers={"Authorization": f"Bearer {other}"},
    )
    assert foreign.status_code == 404
    user = embedded_issuer(settings).mint("u", client_id="c", roles=["user"])
    assert (await client.get("/admin/budgets/", headers={"Authorization": f"Bearer {user}"})).status_code == 403


async def test_money_budget_clamps_charges_the_real_cost_and_refuses(world: Any) -> None:
    client, admin, ids = world
    made = await budget(
        client, admin, scope_type="workflow", scope_id=ids["workflow"]["id"], kind="cost", period="day", limit=0.05
    )
    assert made["limit"] == 0.05
    response = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert response.status_code == 200
    # 8 prompt tokens cost 0.008 of the 0.05; the 0.042 left pays for 21 completion tokens at 0.002.
    assert response.headers["x-budget-max-tokens"] == "21"
    assert response.headers["x-request-cost"] == "0.013 EUR"  # the engine reported 5 prompt + 4 completion
    [row] = (await client.get("/admin/budgets/", headers=admin)).json()["data"]
    assert (row["used"], row["reserved"], row["remaining"]) == (0.013, 0, 0.037)

    changed = await client.patch(f"/admin/budgets/{made['id']}", json={"limit": 0.02}, headers=admin)
    assert changed.status_code == 200 and changed.json()["limit"] == 0.02
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=as_key(ids))
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert "daily money budget" in message and "0.007 remain of 0.02" in message


async def test_a_request_cancelled_while_its_lease_is_refilled_leaves_nothing_held(tmp_path: Path) -> None:
    """A client that leaves while its lease is being refilled cancels the request, not the worker thread: the
    grant lands in the lease (the database holds it for this process), nothing is held for the request, and
    stopping gives everything back (seen in `make test` with per-request reservations: two held after the
    concurrency test's early hang-ups)."""
    import asyncio
    import threading
    from zoneinfo import ZoneInfo

    from appliance.budgets.enforce import BudgetEnforcer
    from appliance.budgets.leases import BudgetLeases
    from appliance.budgets.store import BudgetStore, CallLink
    from appliance.db.engine import make_engine
    from appliance.ledger.pricing import Price
    from appliance.lib.principal import Principal
    from tests.unit.budgets.test_journal import seeded, tokens

    url = f"sqlite:///{tmp_path / 'appliance.db'}"
    seeded(url)
    store = BudgetStore(make_engine(url, serialized_writes=True), ZoneInfo("UTC"), gateway_id="gw_test")
    leases = BudgetLeases(store, ZoneInfo("UTC"))
    entered, release = threading.Event(), threading.Event()
    grant = store.grant

    def slow_grant(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(10)
        return grant(*args, **kwargs)

    store.grant = slow_grant  # type: ignore[method-assign]
    principal = Principal(kind="api_key", subject="k", roles=frozenset({"user"}), tenant_id="ten_1", workflow_id="wf_1")

    async def count() -> int:
        return 10

    enforcer = BudgetEnforcer(store, leases)
    request = asyncio.create_task(enforcer.enforce(principal, "r1", CallLink(), Price(), count, 40, 1))
    assert await asyncio.to_thread(entered.wait, 10)
    request.cancel()  # the client left
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await request
    for _ in range(100):
        if all(lease.granted for lease in leases._leases.values()):
            break
        await asyncio.sleep(0.05)
    assert [lease.held for lease in leases._leases.values()] == [0], "the grant landed in the lease, none held"
    assert await leases.stop(), "every lease given back"
    assert store.dangling() == 0 and tokens(store) == (0, 0), "nothing stays reserved, nothing is charged"

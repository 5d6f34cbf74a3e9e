"""Who sets budgets: platform admins any; a tenant's admins (an admin-scoped key of the tenant) only below the
tenant, within the ceilings above, and never a platform budget. Every change is audited with its limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import Client, admin_headers, fake_settings, tenant_with_key


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return fake_settings(tmp_path, fake_engine)


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """A platform admin; tenant acme (workflow, agent, an inference key of the agent, an admin-scoped key) and
    tenant globex."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        acme = await tenant_with_key(client, admin, "acme")
        agent = (
            await client.post("/admin/agents", json={"workflow_id": acme["workflow"]["id"], "name": "a"}, headers=admin)
        ).json()
        agent_key = (
            await client.post(
                "/admin/api-keys", json={"workflow_id": acme["workflow"]["id"], "agent_id": agent["id"]}, headers=admin
            )
        ).json()
        tenant_admin = (
            await client.post(
                "/admin/api-keys", json={"workflow_id": acme["workflow"]["id"], "scopes": ["admin"]}, headers=admin
            )
        ).json()
        yield {
            "client": client,
            "admin": admin,
            "acme": acme,
            "agent": agent,
            "agent_key": agent_key,
            "tenant_admin": {"Authorization": f"Bearer {tenant_admin['key']}"},
            "globex": await tenant_with_key(client, admin, "globex"),
        }


def body(scope_type: str, scope_id: str, limit: float, kind: str = "tokens", period: str = "day") -> dict[str, Any]:
    return {"scope_type": scope_type, "scope_id": scope_id, "kind": kind, "period": period, "limit": limit}


async def made(client: Client, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    response = await client.post("/admin/budgets/", json=body(**fields), headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def audit_of(client: Client, settings: Settings, event_type: str) -> list[dict[str, Any]]:
    auditor = admin_headers(settings, roles=("auditor",))
    response = await client.get("/admin/audit/", params={"event_type": event_type}, headers=auditor)
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def test_a_tenant_admin_cannot_raise_lower_or_delete_a_platform_budget(world: dict[str, Any]) -> None:
    client, admin, tenant_admin = world["client"], world["admin"], world["tenant_admin"]
    tenant_id = world["acme"]["tenant"]["id"]
    platform = await made(client, admin, scope_type="tenant", scope_id=tenant_id, limit=1000)
    assert platform["owner"] == "platform"
    for limit in (5000, 10):
        raised = await client.patch(f"/admin/budgets/{platform['id']}", json={"limit": limit}, headers=tenant_admin)
        assert raised.status_code == 403, raised.text
        error = raised.json()["error"]
        assert error["type"] == "permission_error" and "set by a platform administrator" in error["message"]
    deleted = await client.delete(f"/admin/budgets/{platform['id']}", headers=tenant_admin)
    assert deleted.status_code == 403 and "cannot delete it" in deleted.json()["error"]["message"]
    [row] = (await client.get("/admin/budgets/", headers=tenant_admin)).json()["data"]
    assert (row["id"], row["limit"], row["owner"]) == (platform["id"], 1000, "platform")
    on_tenant = await client.post(
        "/admin/budgets/", json=body("tenant", tenant_id, 9000, period="month"), headers=tenant_admin
    )
    assert on_tenant.status_code == 403 and "platform administrator" in on_tenant.json()["error"]["message"]
    changed = await client.patch(f"/admin/budgets/{platform['id']}", json={"limit": 2000}, headers=admin)
    assert changed.status_code == 200 and changed.json()["limit"] == 2000, "platform admins set any budget"


async def test_a_tenant_admin_budgets_only_within_every_ceiling_above(world: dict[str, Any]) -> None:
    client, admin, tenant_admin = world["client"], world["admin"], world["tenant_admin"]
    acme, agent, key = world["acme"], world["agent"], world["agent_key"]
    await made(client, admin, scope_type="tenant", scope_id=acme["tenant"]["id"], limit=1000)
    workflow = acme["workflow"]["id"]
    above = await client.post("/admin/budgets/", json=body("workflow", workflow, 2000), headers=tenant_admin)
    assert above.status_code == 403 and "above budget" in above.json()["error"]["message"]
    own = await made(client, tenant_admin, scope_type="workflow", scope_id=workflow, limit=800)
    assert own["owner"] == "tenant"
    assert (
        await client.post("/admin/budgets/", json=body("agent", agent["id"], 900), headers=tenant_admin)
    ).status_code == 403
    await made(client, tenant_admin, scope_type="agent", scope_id=agent["id"], limit=500)
    assert (
        await client.post("/admin/budgets/", json=body("api_key", key["id"], 600), headers=tenant_admin)
    ).status_code == 403
    key_budget = await made(client, tenant_admin, scope_type="api_key", scope_id=key["id"], limit=400)
    raised = await client.patch(f"/admin/budgets/{key_budget['id']}", json={"limit": 501}, headers=tenant_admin)
    assert raised.status_code == 403, "a patch stays within the ceilings too"
    lowered = await client.patch(f"/admin/budgets/{key_budget['id']}", json={"limit": 300}, headers=tenant_admin)
    assert lowered.status_code == 200 and lowered.json()["limit"] == 300
    assert (await client.delete(f"/admin/budgets/{key_budget['id']}", headers=tenant_admin)).status_code == 204
    # Per-call kinds have ceilings too.
    await made(
        client, admin, scope_type="tenant", scope_id=acme["tenant"]["id"], limit=100, kind="max_tokens", period="none"
    )
    too_many = body("workflow", workflow, 200, kind="max_tokens", period="none")
    assert (await client.post("/admin/budgets/", json=too_many, headers=tenant_admin)).status_code == 403
    await made(
        client, tenant_admin, scope_type="workflow", scope_id=workflow, limit=50, kind="max_tokens", period="none"
    )
    # Another tenant's scopes do not exist for them.
    foreign = body("workflow", world["globex"]["workflow"]["id"], 10)
    assert (await client.post("/admin/budgets/", json=foreign, headers=tenant_admin)).status_code == 404


async def test_a_tenant_admin_cannot_drop_a_platform_budget_by_deleting_its_scope(world: dict[str, Any]) -> None:
    client, admin, tenant_admin = world["client"], world["admin"], world["tenant_admin"]
    agent = world["agent"]
    await made(client, admin, scope_type="api_key", scope_id=world["agent_key"]["id"], limit=100)
    for path in (f"/admin/agents/{agent['id']}", f"/admin/workflows/{world['acme']['workflow']['id']}"):
        refused = await client.delete(path, headers=tenant_admin)
        assert refused.status_code == 403 and "set by a platform administrator" in refused.json()["error"]["message"]
    assert (await client.delete(f"/admin/agents/{agent['id']}", headers=admin)).status_code == 204
    tenant = world["acme"]["tenant"]["id"]
    refused = await client.delete(f"/admin/tenants/{tenant}", headers=tenant_admin)
    assert refused.status_code == 403 and "platform administrator" in refused.json()["error"]["message"]
    assert (await client.get(f"/admin/tenants/{tenant}", headers=admin)).status_code == 200


async def test_only_admins_set_budgets(world: dict[str, Any], settings: Settings) -> None:
    client = world["client"]
    tenant_id = world["acme"]["tenant"]["id"]
    operator = admin_headers(settings, roles=("operator",))
    for headers in (operator, world["acme"]["headers"]):  # a platform operator, an inference key
        response = await client.post("/admin/budgets/", json=body("tenant", tenant_id, 10), headers=headers)
        assert response.status_code == 403
    assert (await client.get("/admin/budgets/", headers=operator)).status_code == 200


async def test_every_budget_change_is_audited_with_its_old_and_new_limit(
    world: dict[str, Any], settings: Settings
) -> None:
    client, admin, tenant_admin = world["client"], world["admin"], world["tenant_admin"]
    budget = await made(
        client, admin, scope_type="workflow", scope_id=world["acme"]["workflow"]["id"], limit=0.5, kind="cost"
    )
    assert (
        await client.patch(f"/admin/budgets/{budget['id']}", json={"limit": 0.75}, headers=admin)
    ).status_code == 200
    assert (
        await client.patch(f"/admin/budgets/{budget['id']}", json={"limit": 9}, headers=tenant_admin)
    ).status_code == 403
    assert (await client.delete(f"/admin/budgets/{budget['id']}", headers=admin)).status_code == 204
    created = await audit_of(client, settings, "admin.budgets.create")
    updated = await audit_of(client, settings, "admin.budgets.update")
    deleted = await audit_of(client, settings, "admin.budgets.delete")
    limits = [(r["outcome"], r["detail"]["budget"]["old_limit"], r["detail"]["budget"]["new_limit"]) for r in updated]
    assert sorted(limits) == [("denied", 0.75, 9.0), ("success", 0.5, 0.75)]
    assert [(r["detail"]["budget"]["old_limit"], r["detail"]["budget"]["new_limit"]) for r in created] == [(None, 0.5)]
    assert [(r["detail"]["budget"]["old_limit"], r["detail"]["budget"]["new_limit"]) for r in deleted] == [(0.75, None)]
    assert created[0]["object_id"] == budget["id"] and created[0]["detail"]["budget"]["kind"] == "cost"
    assert all(r["detail"]["budget"]["owner"] == "platform" for r in created + updated + deleted)

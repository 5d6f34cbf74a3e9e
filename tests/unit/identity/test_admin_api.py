"""The identity admin API: CRUD, roles, tenant isolation and API keys, through the real app."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.identity.issuer import EmbeddedIssuer
from tests.unit.identity.conftest import bearer

Client = AsyncTestClient[Any]


def token(issuer: EmbeddedIssuer, *roles: str, tenant: str | None = None) -> dict[str, str]:
    return bearer(issuer.mint("someone", client_id="appliance-console", roles=list(roles), tenant_id=tenant))


async def make(client: Client, headers: dict[str, str], path: str, **body: Any) -> dict[str, Any]:
    response = await client.post(path, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture
async def world(client: Client, issuer: EmbeddedIssuer) -> dict[str, Any]:
    """Two tenants, each with a workflow, an agent and an inference key."""
    admin = token(issuer, "admin")
    out: dict[str, Any] = {"admin": admin}
    for name in ("acme", "globex"):
        tenant = await make(client, admin, "/admin/tenants", name=name)
        workflow = await make(client, admin, "/admin/workflows", tenant_id=tenant["id"], name="support")
        agent = await make(client, admin, "/admin/agents", workflow_id=workflow["id"], name="triage")
        key = await make(client, admin, "/admin/api-keys", workflow_id=workflow["id"], agent_id=agent["id"])
        out[name] = {"tenant": tenant, "workflow": workflow, "agent": agent, "key": key}
    return out


async def test_a_new_key_is_shown_once_and_works_on_v1(client: Client, world: dict[str, Any], settings: Any) -> None:
    created = world["acme"]["key"]
    assert created["key"].startswith("apk_") and "secret_hash" not in created
    listed = (await client.get("/admin/api-keys", headers=world["admin"])).json()
    assert listed["total"] == 2
    assert all("key" not in row and "secret_hash" not in row for row in listed["data"])
    assert (await client.get("/v1/models", headers=bearer(created["key"]))).status_code == 200
    stored = sqlite3.connect(Path(settings.data_dir) / "appliance.db").execute("SELECT secret_hash FROM api_keys")
    secret = created["key"].rsplit("_", 1)[1]
    assert all(secret not in row[0] for row in stored)


async def test_revoked_keys_stop_at_once_and_expired_ones_within_a_second(
    client: Client, world: dict[str, Any], issuer: EmbeddedIssuer, settings: Any
) -> None:
    """Revoked through this process: refused on the next request. Changed in the database by another process:
    refused within a second (keys are checked against the database once a second)."""
    key = world["acme"]["key"]
    assert (await client.get("/v1/models", headers=bearer(key["key"]))).status_code == 200
    revoked = await client.delete(f"/admin/api-keys/{key['id']}", headers=world["admin"])
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert (await client.get("/v1/models", headers=bearer(key["key"]))).status_code == 401

    soon = datetime.now(UTC) + timedelta(hours=1)
    other = await make(
        client,
        world["admin"],
        "/admin/api-keys",
        workflow_id=world["globex"]["workflow"]["id"],
        expires_at=soon.isoformat(),
    )
    assert (await client.get("/v1/models", headers=bearer(other["key"]))).status_code == 200
    db = sqlite3.connect(Path(settings.data_dir) / "appliance.db")
    db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", ("2000-01-01 00:00:00", other["id"]))
    db.commit()
    changed = time.monotonic()
    while (await client.get("/v1/models", headers=bearer(other["key"]))).status_code == 200:
        assert time.monotonic() - changed < 1.2, "an expired key still served after a second"
        await asyncio.sleep(0.05)


async def test_wrong_secret_for_a_real_key_id_is_refused(client: Client, world: dict[str, Any]) -> None:
    key = world["acme"]["key"]["key"]
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert (await client.get("/v1/models", headers=bearer(forged))).status_code == 401


async def test_tenant_bound_principals_see_only_their_tenant(
    client: Client, world: dict[str, Any], issuer: EmbeddedIssuer
) -> None:
    acme, globex = world["acme"], world["globex"]
    acme_admin = token(issuer, "admin", tenant=acme["tenant"]["id"])
    tenants = (await client.get("/admin/tenants", headers=acme_admin)).json()
    assert [t["id"] for t in tenants["data"]] == [acme["tenant"]["id"]]
    # Asking for the other tenant's rows, by filter or by id, yields nothing of theirs.
    workflows = (await client.get(f"/admin/workflows?tenant_id={globex['tenant']['id']}", headers=acme_admin)).json()
    assert [w["tenant_id"] for w in workflows["data"]] == [acme["tenant"]["id"]]
    for path in (
        f"/admin/tenants/{globex['tenant']['id']}",
        f"/admin/workflows/{globex['workflow']['id']}",
        f"/admin/agents/{globex['agent']['id']}",
        f"/admin/api-keys/{globex['key']['id']}",
    ):
        response = await client.get(path, headers=acme_admin)
        assert response.status_code == 404 and "globex" not in response.text
        assert (await client.delete(path, headers=acme_admin)).status_code == 404
    response = await client.post("/admin/api-keys", json={"workflow_id": globex["workflow"]["id"]}, headers=acme_admin)
    assert response.status_code == 404


async def test_an_admin_scoped_key_of_tenant_a_cannot_touch_tenant_b(client: Client, world: dict[str, Any]) -> None:
    acme, globex = world["acme"], world["globex"]
    key = await make(client, world["admin"], "/admin/api-keys", workflow_id=acme["workflow"]["id"], scopes=["admin"])
    headers = bearer(key["key"])
    assert (await client.get(f"/admin/workflows/{acme['workflow']['id']}", headers=headers)).status_code == 200
    assert (await client.get(f"/admin/workflows/{globex['workflow']['id']}", headers=headers)).status_code == 404
    assert (await client.post("/admin/tenants", json={"name": "mine"}, headers=headers)).status_code == 403


async def test_roles_are_enforced(client: Client, world: dict[str, Any], issuer: EmbeddedIssuer) -> None:
    user, operator, auditor = token(issuer, "user"), token(issuer, "operator"), token(issuer, "auditor")
    assert (await client.get("/admin/tenants", headers=user)).status_code == 403
    assert (await client.get("/admin/tenants", headers=bearer(world["acme"]["key"]["key"]))).status_code == 403
    assert (await client.get("/admin/tenants", headers=auditor)).status_code == 403
    assert (await client.get("/admin/tenants", headers=operator)).status_code == 200
    assert (await client.post("/admin/tenants", json={"name": "x"}, headers=operator)).status_code == 403
    assert (await client.get("/v1/models", headers=auditor)).status_code == 403
    tenant_user = token(issuer, "user", tenant=world["acme"]["tenant"]["id"])
    assert (await client.get("/v1/models", headers=tenant_user)).status_code == 200
    assert (await client.get("/v1/models", headers=operator)).status_code == 200  # platform operators: no tenant
    refused = await client.get("/v1/models", headers=user)  # a user token without a tenant claim
    assert refused.status_code == 403 and "bound to no tenant" in refused.json()["error"]["message"]


async def test_pagination_conflicts_and_validation(client: Client, world: dict[str, Any]) -> None:
    admin = world["admin"]
    for n in range(3):
        await make(client, admin, "/admin/tenants", name=f"extra-{n}")
    first = (await client.get("/admin/tenants?limit=2&offset=0", headers=admin)).json()
    second = (await client.get("/admin/tenants?limit=2&offset=2", headers=admin)).json()
    assert first["total"] == second["total"] == 5
    assert len({t["id"] for t in first["data"] + second["data"]}) == 4
    duplicate = await client.post("/admin/tenants", json={"name": "acme"}, headers=admin)
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "conflict"
    invalid = await client.post("/admin/tenants", json={"name": ""}, headers=admin)
    assert invalid.status_code == 400 and invalid.json()["error"]["type"] == "invalid_request_error"
    assert (await client.get("/admin/tenants?limit=1000", headers=admin)).status_code == 400


async def test_agent_of_another_workflow_is_refused_for_a_key(client: Client, world: dict[str, Any]) -> None:
    acme = world["acme"]
    other = await make(client, world["admin"], "/admin/workflows", tenant_id=acme["tenant"]["id"], name="billing")
    response = await client.post(
        "/admin/api-keys", json={"workflow_id": other["id"], "agent_id": acme["agent"]["id"]}, headers=world["admin"]
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "agent_id"


async def test_deleting_a_tenant_removes_what_it_owns(client: Client, world: dict[str, Any]) -> None:
    acme = world["acme"]
    assert (await client.delete(f"/admin/tenants/{acme['tenant']['id']}", headers=world["admin"])).status_code == 204
    assert (await client.get(f"/admin/workflows/{acme['workflow']['id']}", headers=world["admin"])).status_code == 404
    assert (await client.get("/v1/models", headers=bearer(acme["key"]["key"]))).status_code == 401


async def test_users_are_mirrored_on_first_sight(client: Client, issuer: EmbeddedIssuer) -> None:
    headers = bearer(
        issuer.mint("alice", client_id="appliance-console", roles=["admin"], extra={"preferred_username": "alice"})
    )
    users = (await client.get("/admin/users", headers=headers)).json()
    assert [(u["subject"], u["username"], u["roles"]) for u in users["data"]] == [("alice", "alice", ["admin"])]


async def test_secrets_never_reach_the_logs(
    client: Client, world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = world["acme"]["key"]["key"]
    await client.get("/v1/models", headers=bearer(key))
    await client.get("/v1/models", headers=bearer(key[:-3] + "xyz"))
    await client.get("/v1/models", headers=bearer("eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"))
    text = caplog.text
    assert key.rsplit("_", 1)[1] not in text and "c2lnbmF0dXJl" not in text

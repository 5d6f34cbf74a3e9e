"""Every protected route declares who may call it, and a guard's refusal reads as a handler's did: the same
status, OpenAI error envelope and audit record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.auth import is_public
from appliance.lib.guards import BODY_CHECK_KEY, RoleGuard
from appliance.lib.principal import NO_TENANT
from appliance.settings import Settings
from tests.support.gateway import add_tenant, admin_headers

Client = AsyncTestClient[Any]

# Routes whose role rule runs in their handler or service, each with the reason (its `opt` says it too).
CHECKED_IN_BODY = {("PATCH", "/admin/local-accounts/{username:str}")}
FORBIDDEN = {
    "message": "You are not allowed to do this.",
    "type": "permission_error",
    "param": None,
    "code": "forbidden",
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


def handlers(app: Litestar) -> list[tuple[str, str, HTTPRouteHandler]]:
    """(method, path, handler) of every route the app serves, less the OPTIONS answers Litestar adds itself."""
    found = []
    for route in app.routes:
        for handler in route.route_handlers:
            if not isinstance(handler, HTTPRouteHandler):
                continue
            for method in sorted(handler.http_methods):
                if method == "OPTIONS" and handler.handler_name == "options_handler":
                    continue  # answers with the route's methods only, after authentication like any request
                found.append((method, route.path, handler))
    return found


def role_guards(handler: HTTPRouteHandler) -> list[RoleGuard]:
    return [guard for guard in handler.resolve_guards() if isinstance(guard, RoleGuard)]


def test_every_protected_route_declares_who_may_call_it(settings: Settings) -> None:
    routes = handlers(create_app(settings))
    protected = [(method, path, handler) for method, path, handler in routes if not is_public(path)]
    assert len(protected) > 80 and ("POST", "/v1/chat/completions") in {(m, p) for m, p, _ in protected}
    unguarded = [
        (m, p) for m, p, handler in protected if not role_guards(handler) and BODY_CHECK_KEY not in handler.opt
    ]
    assert unguarded == [], "a protected route needs a role guard (appliance.lib.guards), or opt=checked_in_body()"
    in_body = {(m, p) for m, p, handler in protected if BODY_CHECK_KEY in handler.opt}
    assert in_body == CHECKED_IN_BODY, "a role rule in a handler's body is an exception: list it here with why"
    assert all(len(handler.opt[BODY_CHECK_KEY]) > 20 for m, p, handler in protected if (m, p) in in_body)
    # A public path has no principal: a role guard there would refuse everyone.
    assert [(m, p) for m, p, handler in routes if is_public(p) and role_guards(handler)] == []


async def denied_records(client: Client, settings: Settings, event_type: str) -> list[dict[str, Any]]:
    found = await client.get(
        "/admin/audit/", params={"event_type": event_type}, headers=admin_headers(settings, ("auditor",))
    )
    assert found.status_code == 200, found.text
    return [r for r in found.json()["data"] if r["outcome"] == "denied"]


async def test_a_guard_refuses_with_the_envelope_and_audit_record_of_a_handler(
    client: Client, settings: Settings
) -> None:
    operator = admin_headers(settings, ("operator",))
    refused = await client.post("/admin/tenants", json={"name": "acme"}, headers=operator)
    assert (refused.status_code, refused.json()) == (403, {"error": FORBIDDEN})
    assert refused.headers["x-request-id"]
    [record] = await denied_records(client, settings, "admin.tenants.create")
    assert (record["subject"], record["request_id"]) == ("root", refused.headers["x-request-id"])
    assert record["detail"]["status"] == 403
    # Before the body is read: a caller without the role learns nothing about what the route accepts.
    assert (await client.post("/admin/tenants", content=b"{not json", headers=operator)).status_code == 403
    assert (await client.post("/admin/tenants", json={"name": "acme"}, headers=admin_headers(settings))).is_success


async def test_a_route_declared_action_names_its_refused_records(client: Client, settings: Settings) -> None:
    refused = await client.post("/admin/users/someone/sign-out", headers=admin_headers(settings, ("operator",)))
    assert (refused.status_code, refused.json()) == (403, {"error": FORBIDDEN})
    assert len(await denied_records(client, settings, "admin.users.sign_out")) == 1
    assert await denied_records(client, settings, "admin.users.create") == []


async def test_platform_and_inference_guards_keep_their_reasons(client: Client, settings: Settings) -> None:
    add_tenant(settings, "acme")
    tenant_auditor = admin_headers(settings, ("auditor",), tenant="acme")
    verify = await client.get("/admin/audit/verify", headers=tenant_auditor)
    assert verify.status_code == 403
    assert verify.json()["error"]["message"] == "The chain covers every tenant: only platform auditors verify it."
    assert (await client.get("/admin/audit/", headers=tenant_auditor)).status_code == 200  # its tenant's records
    tenant_operator = admin_headers(settings, ("operator",), tenant="acme")
    metrics = await client.get("/metrics", headers=tenant_operator)
    assert metrics.status_code == 403 and metrics.json()["error"]["message"].startswith("Metrics cover every tenant")
    tenantless_user = await client.get("/v1/models", headers=admin_headers(settings, ("user",)))
    assert (tenantless_user.status_code, tenantless_user.json()["error"]) == (403, {**FORBIDDEN, "message": NO_TENANT})
    auditor = await client.post("/v1/chat/completions", json={}, headers=admin_headers(settings, ("auditor",)))
    assert (auditor.status_code, auditor.json()) == (403, {"error": FORBIDDEN})
    console = await client.get("/console/session", headers=admin_headers(settings))
    assert console.status_code == 401 and console.json()["error"]["type"] == "authentication_error"

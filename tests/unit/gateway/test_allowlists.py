"""Model allowlists: an administrator decides which models a tenant, and one of its API keys, may call. A model
left out is refused (403 `model_not_allowed`) on the routes that name one and is not listed; a key gets what
both lists allow; null restores every model; a tenant administrator cannot widen its own list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import EngineRoute
from tests.support import fake_engine as fake
from tests.support.gateway import admin_headers, fake_settings, tenant_with_key

CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


async def _status(client: Any, model: str, headers: dict[str, str]) -> int:
    if model == "embed":
        return (await client.post("/v1/embeddings", json={"model": model, "input": "x"}, headers=headers)).status_code
    return (await client.post("/v1/chat/completions", json={"model": model, **CHAT}, headers=headers)).status_code


async def test_tenant_and_key_allowlists(tmp_path: Path, fake_engine: fake.FakeEngine) -> None:
    settings = fake_settings(tmp_path, fake_engine)
    routes = [
        *settings.gateway.routes,
        EngineRoute(model="other", url=fake_engine.url),
        EngineRoute(model="embed", url=fake_engine.url, runner="pooling"),
    ]
    settings.gateway.routes = routes
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        acme = await tenant_with_key(client, admin, "acme")
        headers = acme["headers"]
        assert {await _status(client, m, headers) for m in ("fake", "other", "embed")} == {200}, "no list: all"

        tenant_id = acme["tenant"]["id"]
        changed = await client.patch(f"/admin/tenants/{tenant_id}", json={"allowed_models": ["fake"]}, headers=admin)
        assert changed.status_code == 200 and changed.json()["allowed_models"] == ["fake"]
        assert await _status(client, "fake", headers) == 200
        refused = await client.post("/v1/chat/completions", json={"model": "other", **CHAT}, headers=headers)
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_allowed", "model") and "this tenant" in error["message"]
        assert await _status(client, "embed", headers) == 403
        listed = (await client.get("/v1/models", headers=headers)).json()["data"]
        assert [model["id"] for model in listed] == ["fake"]
        assert (await client.get("/v1/models/other", headers=headers)).status_code == 404

        # A key narrower than its tenant: only what both allow.
        key = (
            await client.post(
                "/admin/api-keys",
                json={"workflow_id": acme["workflow"]["id"], "allowed_models": ["other"]},
                headers=admin,
            )
        ).json()
        narrow = {"Authorization": f"Bearer {key['key']}"}
        assert key["allowed_models"] == ["other"]
        assert await _status(client, "fake", narrow) == 403, "its tenant allows it, the key does not"
        assert await _status(client, "other", narrow) == 403, "the key allows it, its tenant does not"

        # Back to every model (null), at once in this process.
        cleared = await client.patch(f"/admin/tenants/{tenant_id}", json={"allowed_models": None}, headers=admin)
        assert cleared.status_code == 200 and cleared.json()["allowed_models"] is None
        assert await _status(client, "other", headers) == 200
        assert await _status(client, "other", narrow) == 200 and await _status(client, "fake", narrow) == 403

        # A tenant's own administrator may not widen (nor set) its list.
        tenant_admin = admin_headers(settings, tenant=tenant_id)
        widen = await client.patch(
            f"/admin/tenants/{tenant_id}", json={"allowed_models": ["fake", "other"]}, headers=tenant_admin
        )
        assert widen.status_code == 403
        bad = await client.patch(f"/admin/tenants/{tenant_id}", json={"allowed_models": "fake"}, headers=admin)
        assert bad.status_code == 400

"""API keys as the gateway checks them: when a key was last used is recorded (at most once a minute per key and
process, a write of its own queued behind the process's other writers)."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import Settings
from tests.support.gateway import admin_headers, tenant_with_key


async def test_a_keys_use_is_recorded_as_its_last_use(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    admin = admin_headers(settings)
    async with AsyncTestClient(app=create_app(settings)) as client:
        known = await tenant_with_key(client, admin, "acme")
        path = f"/admin/api-keys/{known['key']['id']}"
        assert (await client.get(path, headers=admin)).json()["last_used_at"] is None
        assert (await client.get("/v1/models", headers=known["headers"])).status_code == 200
        used = (await client.get(path, headers=admin)).json()["last_used_at"]
        assert used is not None and used >= known["key"]["created_at"]

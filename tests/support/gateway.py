"""Helpers for tests of the gateway app against the fake engine: settings, an admin, a tenant with a key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from litestar.testing import AsyncTestClient
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.identity.models import Tenant
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine

Client = AsyncTestClient[Any]


def fake_settings(data_dir: Path, engine: FakeEngine, **sections: Any) -> Settings:
    """Settings of an app whose one model, `fake`, is served by the fake engine."""
    return Settings(
        data_dir=data_dir, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=engine.url)]), **sections
    )


def admin_headers(settings: Settings, roles: tuple[str, ...] = ("admin",), tenant: str | None = None) -> dict[str, str]:
    """A token of the embedded issuer: a platform administrator, or one of ``tenant``."""
    token = embedded_issuer(settings).mint("root", client_id="c", roles=list(roles), tenant_id=tenant)
    return {"Authorization": f"Bearer {token}"}


async def tenant_with_key(client: httpx.AsyncClient, admin: dict[str, str], name: str) -> dict[str, Any]:
    """A tenant, a workflow in it and an inference key of that workflow; ``headers`` authenticate as the key."""
    tenant = (await client.post("/admin/tenants", json={"name": name}, headers=admin)).json()
    workflow = (
        await client.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin)
    ).json()
    key = (await client.post("/admin/api-keys", json={"workflow_id": workflow["id"]}, headers=admin)).json()
    return {"tenant": tenant, "workflow": workflow, "key": key, "headers": {"Authorization": f"Bearer {key['key']}"}}


def add_tenant(settings: Settings, tenant_id: str, name: str | None = None) -> None:
    """A tenant with a fixed id, for tests whose tokens name it (a token's tenant must exist)."""
    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
        with Session(engine) as session:
            session.add(Tenant(id=tenant_id, name=name or tenant_id))
            session.commit()
    finally:
        engine.dispose()

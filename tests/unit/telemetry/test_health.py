"""Readiness: its status code for anyone (the node's `appliance status` probes it without credentials), its
detail (engines, their URLs, their errors) only for platform admins and operators."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine, free_port
from tests.support.gateway import add_tenant


def _settings(tmp_path: Path, fake_engine: FakeEngine, down: bool) -> Settings:
    routes = [EngineRoute(model="fake", url=fake_engine.url)]
    if down:
        routes.append(EngineRoute(model="down", url=f"http://127.0.0.1:{free_port()}"))
    return Settings(data_dir=tmp_path, gateway=GatewaySettings(routes=routes))


def _bearer(settings: Settings, roles: list[str], tenant_id: str | None = None) -> dict[str, str]:
    token = embedded_issuer(settings).mint("someone", client_id="c", roles=roles, tenant_id=tenant_id)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=[False, True], ids=["ready", "engine-down"])
async def app(request: Any, tmp_path: Path, fake_engine: FakeEngine) -> AsyncIterator[tuple[Settings, Any, bool]]:
    settings = _settings(tmp_path, fake_engine, down=request.param)
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield settings, client, request.param


async def test_readyz_without_credentials_gives_only_the_status(app: tuple[Settings, Any, bool]) -> None:
    _, client, down = app
    response = await client.get("/readyz")
    assert response.status_code == (503 if down else 200)
    assert response.json() == {"status": "unready" if down else "ready"}


async def test_readyz_for_a_tenant_user_names_models_not_urls(app: tuple[Settings, Any, bool]) -> None:
    settings, client, down = app
    add_tenant(settings, "t1")  # a token's tenant must exist
    response = await client.get("/readyz", headers=_bearer(settings, ["user"], tenant_id="t1"))
    assert response.status_code == (503 if down else 200)
    engines = {row["model"]: row for row in response.json()["engines"]}
    assert engines["fake"] == {"model": "fake", "runner": "generate", "healthy": True}
    assert set(engines) == ({"fake", "down"} if down else {"fake"})
    assert "127.0.0.1" not in response.text and "database" not in response.json()


async def test_readyz_details_for_platform_admins_and_operators(app: tuple[Settings, Any, bool]) -> None:
    settings, client, down = app
    for role in ("admin", "operator"):
        response = await client.get("/readyz", headers=_bearer(settings, [role]))
        assert response.status_code == (503 if down else 200)
        body = response.json()
        assert body["status"] == ("unready" if down else "ready")
        engines = {row["model"]: row for row in body["engines"]}
        assert engines["fake"]["healthy"] is True and engines["fake"]["url"].startswith("http://127.0.0.1:")
        if down:
            assert engines["down"]["healthy"] is False and engines["down"]["error"]
        assert body["database"] == {"healthy": True}


async def test_readyz_with_a_bad_credential_is_401(app: tuple[Settings, Any, bool]) -> None:
    _, client, _down = app
    response = await client.get("/readyz", headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401

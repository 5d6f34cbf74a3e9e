"""A token whose `tenant` claim names no tenant is refused (403), never served unbudgeted (issue #21)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlmodel import Session

from appliance.asgi import create_app
from appliance.db.engine import make_engine
from appliance.identity.models import Tenant
from appliance.identity.setup import embedded_issuer
from appliance.settings import Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import admin_headers, fake_settings

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
# Every /v1 and /v1/rag route, with a body that would be served (or refused for another reason) otherwise.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/completions", {"model": "fake", "prompt": "hi", "max_tokens": 4}),
    ("POST", "/v1/embeddings", {"model": "fake", "input": "hi"}),
    ("GET", "/v1/rag/collections", None),
    ("POST", "/v1/rag/collections", {"name": "c"}),
    ("GET", "/v1/rag/collections/col_x", None),
    ("DELETE", "/v1/rag/collections/col_x", None),
    ("GET", "/v1/rag/collections/col_x/documents", None),
    ("POST", "/v1/rag/query", {"collection": "col_x", "query": "hi"}),
    ("POST", "/v1/rag/chat", {"collection": "col_x", "model": "fake", "messages": CHAT["messages"]}),
]


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return fake_settings(tmp_path, fake_engine)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


def token(settings: Settings, tenant: str) -> dict[str, str]:
    minted = embedded_issuer(settings).mint("mallory", client_id="c", roles=["user"], tenant_id=tenant)
    return {"Authorization": f"Bearer {minted}"}


async def test_a_tenant_claim_naming_no_tenant_is_refused_on_every_v1_route(
    client: AsyncTestClient[Any], settings: Settings
) -> None:
    headers = token(settings, "ten_doesnotexist")
    for method, path, body in ROUTES:
        response = await client.request(method, path, json=body, headers=headers)
        assert response.status_code == 403, (method, path, response.text)
        error = response.json()["error"]
        assert error["type"] == "permission_error" and "tenant" in error["message"], (path, error)


async def test_a_tenant_deleted_while_its_token_is_in_use_is_refused_within_seconds(
    client: AsyncTestClient[Any], settings: Settings
) -> None:
    tenant = (await client.post("/admin/tenants", json={"name": "acme"}, headers=admin_headers(settings))).json()
    headers = token(settings, tenant["id"])
    served = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert served.status_code == 200, served.text
    engine = make_engine(settings.database_url)
    with Session(engine) as session:  # gone without the API (another gateway process, a restore)
        session.delete(session.get(Tenant, tenant["id"]))
        session.commit()
    engine.dispose()
    await asyncio.sleep(1.2)
    refused = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert refused.status_code == 403, refused.text

"""Retrieval through the real app (the fake engine embeds): no tenant, no tenant data (#15 item 6), and a cached
query is still a metered, budgeted request (item 7)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.lib.principal import NO_TENANT
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import admin_headers, tenant_with_key

EMBEDDER = "minilm-l6-v2"


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    routes = [
        EngineRoute(model="fake", url=fake_engine.url),
        EngineRoute(model=EMBEDDER, url=fake_engine.url, runner="pooling"),
    ]
    return Settings(data_dir=tmp_path, gateway=GatewaySettings(routes=routes))


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """Tenant acme with a key and a collection; a platform admin; tokens without a tenant."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        acme = await tenant_with_key(client, admin, "acme")
        made = await client.post("/v1/rag/collections", json={"name": "handbook"}, headers=acme["headers"])
        assert made.status_code == 201, made.text
        yield {
            "client": client,
            "admin": admin,
            "acme": acme,
            "collection": made.json()["id"],
            "user": admin_headers(settings, roles=("user",)),  # a user token without a tenant claim
            "operator": admin_headers(settings, roles=("operator",)),
        }


def requests_to_every_route(collection: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    return [
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/embeddings", {"model": EMBEDDER, "input": "hi"}),
        ("GET", "/v1/rag/collections", None),
        ("POST", "/v1/rag/collections", {"name": "mine"}),
        ("GET", f"/v1/rag/collections/{collection}", None),
        ("GET", f"/v1/rag/collections/{collection}/documents", None),
        ("GET", f"/v1/rag/collections/{collection}/documents/doc_x", None),
        ("DELETE", f"/v1/rag/collections/{collection}/documents/doc_x", None),
        ("DELETE", f"/v1/rag/collections/{collection}", None),
        ("POST", "/v1/rag/query", {"collection_id": collection, "query": "vacation days"}),
        ("POST", "/v1/rag/chat", {**chat, "collection_id": collection}),
    ]


async def test_a_user_without_a_tenant_gets_no_tenant_data(world: dict[str, Any]) -> None:
    client, collection = world["client"], world["collection"]
    for method, path, body in requests_to_every_route(collection):
        response = await client.request(method, path, json=body, headers=world["user"])
        assert response.status_code == 403, (method, path, response.text)
        error = response.json()["error"]
        assert (error["type"], error["message"]) == ("permission_error", NO_TENANT), (method, path)
    upload = await client.post(
        f"/v1/rag/collections/{collection}/documents",
        content=b"planted",
        headers={**world["user"], "Content-Type": "text/plain"},
    )
    assert upload.status_code == 403
    listed = await client.get("/v1/rag/collections", headers=world["acme"]["headers"])
    assert [c["documents"] for c in listed.json()["data"]] == [0], "nothing was planted"


async def test_a_platform_operator_lists_but_neither_changes_nor_reads_content(world: dict[str, Any]) -> None:
    client, collection, operator = world["client"], world["collection"], world["operator"]
    listed = await client.get("/v1/rag/collections", headers=operator)
    assert listed.status_code == 200 and [c["id"] for c in listed.json()["data"]] == [collection]
    assert (await client.get(f"/v1/rag/collections/{collection}", headers=operator)).status_code == 200
    for method, path, body in (
        ("POST", "/v1/rag/collections", {"name": "x", "tenant_id": world["acme"]["tenant"]["id"]}),
        ("DELETE", f"/v1/rag/collections/{collection}", None),
        ("POST", "/v1/rag/query", {"collection_id": collection, "query": "vacation days"}),
    ):
        response = await client.request(method, path, json=body, headers=operator)
        assert response.status_code == 403, (method, path, response.text)
    assert (await client.get(f"/v1/rag/collections/{collection}", headers=world["acme"]["headers"])).status_code == 200


async def test_a_platform_admin_names_the_tenant(world: dict[str, Any]) -> None:
    client, admin = world["client"], world["admin"]
    unnamed = await client.post("/v1/rag/collections", json={"name": "ops"}, headers=admin)
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "tenant_id"
    named = await client.post(
        "/v1/rag/collections", json={"name": "ops", "tenant_id": world["acme"]["tenant"]["id"]}, headers=admin
    )
    assert named.status_code == 201
    query = {"collection_id": world["collection"], "query": "vacation days"}
    assert (await client.post("/v1/rag/query", json=query, headers=admin)).status_code == 200


async def usage_row(settings: Settings, request_id: str) -> dict[str, Any]:
    for _ in range(100):
        connection = sqlite3.connect(Path(settings.data_dir) / "appliance.db")
        connection.row_factory = sqlite3.Row
        row = connection.execute("SELECT * FROM usage_records WHERE request_id = ?", (request_id,)).fetchone()
        if row is not None:
            return dict(row)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no usage row for {request_id}")


async def test_a_cached_query_is_a_metered_budgeted_request(world: dict[str, Any], settings: Settings) -> None:
    client, admin, acme, collection = world["client"], world["admin"], world["acme"], world["collection"]
    budget = {"scope_type": "api_key", "scope_id": acme["key"]["id"], "kind": "requests", "period": "day", "limit": 3}
    made = await client.post("/admin/budgets/", json=budget, headers=admin)
    assert made.status_code == 201
    query = {"collection_id": collection, "query": "how many vacation days?"}
    answers = [await client.post("/v1/rag/query", json=query, headers=acme["headers"]) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["usage"]["cached"] for a in answers] == [False, True, True]
    cached = await usage_row(settings, answers[1].headers["x-request-id"])
    assert (cached["endpoint"], cached["status_code"], cached["retrieval_cached"]) == ("/v1/rag/query", 200, 1)
    assert (cached["prompt_tokens"], cached["model"], cached["tenant_id"]) == (0, EMBEDDER, acme["tenant"]["id"])
    assert cached["api_key_id"] == acme["key"]["id"]

    refused = await client.post("/v1/rag/query", json=query, headers=acme["headers"])
    assert refused.status_code == 429, "the cache is no way around a spent request budget"
    assert refused.json()["error"]["param"] == made.json()["id"] and "data" not in refused.json()
    row = await usage_row(settings, refused.headers["x-request-id"])
    assert (row["status_code"], row["budget_id"], row["retrieval_cached"]) == (429, made.json()["id"], 1)
    [status] = (await client.get("/admin/budgets/", headers=admin)).json()["data"]
    assert (status["used"], status["reserved"]) == (3, 0)

    auditor = admin_headers(settings, roles=("auditor",))
    found = await client.get("/admin/audit/", params={"event_type": "inference.rag.query"}, headers=auditor)
    records = {r["request_id"]: r for r in found.json()["data"]}
    for answer, outcome in ((answers[1], "success"), (answers[2], "success"), (refused, "denied")):
        record = records[answer.headers["x-request-id"]]
        assert (record["object_type"], record["object_id"], record["outcome"]) == (
            "rag.collection",
            collection,
            outcome,
        )
        assert record["detail"]["retrieval"]["cached"] is True and record["detail"]["model"] == EMBEDDER

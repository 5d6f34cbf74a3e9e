"""Deleting a tenant deletes what it stored: its vector collections (their Qdrant Edge shards on disk, not only
their catalog rows) and its captured prompts and answers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.retrieval.vectors import qdrant_name
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import admin_headers, tenant_with_key
from tests.support.records import committed


def rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    connection = sqlite3.connect(data_dir / "appliance.db")
    try:
        return list(connection.execute(sql))
    finally:
        connection.close()


async def test_deleting_a_tenant_deletes_its_collections_and_captured_content(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    routes = [
        EngineRoute(model="fake", url=fake_engine.url),
        EngineRoute(model="minilm-l6-v2", url=fake_engine.url, runner="pooling"),
    ]
    settings = Settings(data_dir=tmp_path, gateway=GatewaySettings(routes=routes))
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        gone = await tenant_with_key(client, admin, "gone")
        kept = await tenant_with_key(client, admin, "kept")
        collections = {}
        for who in (gone, kept):
            tenant_id = who["tenant"]["id"]
            patched = await client.patch(f"/admin/tenants/{tenant_id}", json={"content_capture": True}, headers=admin)
            assert patched.status_code == 200, patched.text
            made = await client.post("/v1/rag/collections", json={"name": "docs"}, headers=who["headers"])
            assert made.status_code == 201, made.text
            collections[tenant_id] = made.json()["id"]
            chat = {"model": "fake", "messages": [{"role": "user", "content": "my card is 4111 1111 1111 1111"}]}
            assert (await client.post("/v1/chat/completions", json=chat, headers=who["headers"])).status_code == 200
        await committed(client.app)
        captured = rows(tmp_path, "SELECT tenant_id, prompt FROM audit_content")
        assert {tenant for tenant, _ in captured} == set(collections)
        assert all("4111" not in prompt for _, prompt in captured), "the card number was redacted"

        deleted = await client.delete(f"/admin/tenants/{gone['tenant']['id']}", headers=admin)
        assert deleted.status_code == 204, deleted.text

    kept_id = kept["tenant"]["id"]
    assert {row[0] for row in rows(tmp_path, "SELECT tenant_id FROM audit_content")} == {kept_id}
    assert rows(tmp_path, "SELECT tenant_id FROM rag_collections") == [(kept_id,)]
    shards = {folder.name for folder in (tmp_path / "qdrant" / "edge").iterdir()}  # Qdrant Edge: a shard a collection
    assert shards == {qdrant_name(collections[kept_id])}, "the deleted tenant's vectors are gone from disk"

"""An upload past the extraction limits gets the OpenAI error envelope with a 413 or a 400, never a 500."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import EngineRoute, GatewaySettings, RetrievalSettings, Settings
from tests.support.fake_engine import EMBEDDINGS_HELD, EMBEDDINGS_HOLDING, FakeEngine
from tests.support.gateway import admin_headers, tenant_with_key
from tests.support.pdf import many_pages_pdf, wide_page_tree_pdf
from tests.unit.identity.test_sign_in_floods import served


async def test_uploads_past_the_limits_are_413_or_400(tmp_path: Path, fake_engine: FakeEngine) -> None:
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(routes=[EngineRoute(model="minilm-l6-v2", url=fake_engine.url, runner="pooling")]),
        retrieval=RetrievalSettings(max_document_pages=3, max_document_characters=5000),
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        acme = await tenant_with_key(client, admin_headers(settings), "acme")
        made = await client.post("/v1/rag/collections", json={"name": "c"}, headers=acme["headers"])
        documents = f"/v1/rag/collections/{made.json()['id']}/documents"
        for raw, media_type, status, code in (
            (many_pages_pdf(4), "application/pdf", 413, "too_many_pages"),
            (b"word " * 2000, "text/plain", 413, "too_much_text"),
            (wide_page_tree_pdf(100_001), "application/pdf", 400, "invalid_document"),
        ):
            response = await client.post(
                documents, content=raw, headers={**acme["headers"], "Content-Type": media_type}
            )
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, "file")


@pytest.mark.timeout(120)
async def test_one_tenant_flooding_uploads_is_held_to_its_share_and_others_still_ingest(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    """Issue #21: each tenant has at most ``max_ingestions_per_tenant`` documents being ingested at once (the
    whole ingestion: extraction, embedding, writing); more are refused at once (429, Retry-After), so a flood of
    one tenant's uploads neither queues without bound at the embedding engine nor takes every extraction slot
    from the other tenants."""
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(routes=[EngineRoute(model="minilm-l6-v2", url=fake_engine.url, runner="pooling")]),
        retrieval=RetrievalSettings(max_ingestions_per_tenant=2),
        models_cache_dir=Path(__file__).resolve().parents[3] / "var" / "models",  # the tokenizer chunks
    )
    async with served(settings) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        admin = admin_headers(settings)
        acme, other = await tenant_with_key(client, admin, "acme"), await tenant_with_key(client, admin, "other")

        async def upload(tenant: dict[str, Any], text: str) -> httpx.Response:
            made = await client.post(
                "/v1/rag/collections", json={"name": secrets.token_hex(4)}, headers=tenant["headers"]
            )
            assert made.status_code == 201, made.text
            return await client.post(
                f"/v1/rag/collections/{made.json()['id']}/documents",
                content=text.encode(),
                headers={**tenant["headers"], "Content-Type": "text/plain"},
            )

        EMBEDDINGS_HELD.set()
        try:
            flood = [asyncio.ensure_future(upload(acme, f"hold: document {n} of the flood")) for n in range(6)]
            deadline = time.monotonic() + 20
            while (sum(task.done() for task in flood) < 4 or EMBEDDINGS_HOLDING[0] < 2) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            refused = [task.result() for task in flood if task.done()]
            assert len(refused) == 4, "all but two of the tenant's uploads are refused while two are in flight"
            for response in refused:
                assert response.status_code == 429, response.text
                assert response.json()["error"]["code"] == "too_many_ingestions"
                assert int(response.headers["Retry-After"]) >= 1
                assert response.headers["Connection"] == "close", "the unread document is not read to keep it"
            assert EMBEDDINGS_HOLDING[0] == 2
            # Another tenant is not refused: its document is ingested while the flood's two are held.
            answer = await upload(other, "a document of another tenant")
            assert answer.status_code == 201, answer.text
        finally:
            EMBEDDINGS_HELD.clear()
        held = await asyncio.gather(*(task for task in flood if not task.done()))
        assert [response.status_code for response in held] == [201, 201]
        again = await upload(acme, "the flood is over: the tenant ingests again")
        assert again.status_code == 201, again.text

"""An upload past the extraction limits gets the OpenAI error envelope with a 413 or a 400, never a 500."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import EngineRoute, GatewaySettings, RetrievalSettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import admin_headers, tenant_with_key
from tests.support.pdf import many_pages_pdf, wide_page_tree_pdf


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

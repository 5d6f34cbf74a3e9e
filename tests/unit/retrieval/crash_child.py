"""The process that ``test_edge_crash`` kills: a gateway (in process, the fake engine embedding) that ingests
one small document, writes what the test needs to ``child.json``, then ingests a large one in small batches
until it is killed. Run as ``python -m tests.unit.retrieval.crash_child DATA_DIR ENGINE_URL``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from tests.support.gateway import admin_headers, tenant_with_key
from tests.unit.retrieval.test_edge_crash import LARGE, SMALL, crash_settings


async def main(data_dir: Path, engine_url: str) -> None:
    settings = crash_settings(data_dir, engine_url)
    async with AsyncTestClient(app=create_app(settings), timeout=600) as client:
        acme = await tenant_with_key(client, admin_headers(settings), "acme")
        made = await client.post("/v1/rag/collections", json={"name": "c"}, headers=acme["headers"])
        collection = made.json()["id"]
        documents = f"/v1/rag/collections/{collection}/documents"
        small = await client.post(f"{documents}?name=small.txt", content=SMALL, headers=acme["headers"])
        assert small.status_code == 201, small.text
        (data_dir / "child.json").write_text(json.dumps({"collection": collection, "headers": acme["headers"]}))
        await client.post(f"{documents}?name=large.txt", content=LARGE, headers=acme["headers"])
        (data_dir / "child.done").write_text("the large document was ingested before the kill")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))

"""Bounded work pools: heavy work of one kind runs on its own threads, never on those database work uses, and a
flood of it is refused at once (429) instead of queued without bound."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.lib.errors import RateLimitedError
from appliance.lib.work import WorkPool
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import admin_headers, tenant_with_key


async def test_a_full_pool_refuses_and_other_work_goes_on() -> None:
    pool = WorkPool("heavy", workers=1, queue=1, busy="busy now", retry_after_s=3)
    release = threading.Event()
    try:
        first = asyncio.create_task(pool.run(release.wait, 10))
        second = asyncio.create_task(pool.run(release.wait, 10))  # waits for the one thread
        await asyncio.sleep(0.05)
        assert pool.full
        with pytest.raises(RateLimitedError) as refused:
            await pool.run(time.sleep, 0)
        assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "3"}
        started = time.monotonic()
        await asyncio.to_thread(time.sleep, 0)  # database work: the default pool is untouched
        assert time.monotonic() - started < 0.5
        release.set()
        assert await first and await second
        assert pool.in_flight == 0 and not pool.full
    finally:
        release.set()
        pool.close()


async def test_uploads_past_the_extraction_pool_are_refused_while_other_requests_go_on(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    """Documents being extracted fill their pool: the next upload is refused (429), an embeddings request is
    answered meanwhile (its database work runs on other threads)."""
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(routes=[EngineRoute(model="minilm-l6-v2", url=fake_engine.url, runner="pooling")]),
    )
    app = create_app(settings)
    release = threading.Event()
    async with AsyncTestClient(app=app) as client:
        acme = await tenant_with_key(client, admin_headers(settings), "acme")
        made = await client.post("/v1/rag/collections", json={"name": "c"}, headers=acme["headers"])
        documents = f"/v1/rag/collections/{made.json()['id']}/documents"
        retrieval = app.dependencies["retrieval"].dependency()
        busy = [asyncio.create_task(retrieval._extraction.run(release.wait, 30)) for _ in range(5)]  # 1 + 4 queued
        try:
            await asyncio.sleep(0.05)
            upload = {**acme["headers"], "Content-Type": "text/plain"}
            refused = await client.post(documents, content=b"a short document", headers=upload)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "5", refused.text
            assert refused.json()["error"]["type"] == "rate_limit_error"
            embed = {"model": "minilm-l6-v2", "input": "still answered"}
            answered = await client.post("/v1/embeddings", json=embed, headers=acme["headers"])
            assert answered.status_code == 200
        finally:
            release.set()
            await asyncio.gather(*busy)
        # Taken again once the pool has room (it then needs the embedding model's tokenizer, which this test
        # does not install: 503 from the next stage, not 429 from this one).
        accepted = await client.post(documents, content=b"a short document", headers=upload)
        assert accepted.status_code != 429 and accepted.json()["error"]["code"] == "retrieval_unavailable"

"""Hostile bodies (issue #21): deeply nested JSON is refused with 400 on /v1, /v1/rag and /admin, never a 500
(the decoder's recursion limit was reached inside the framework), and bodies past the limit are 413 on every
area, sign-in included; the appliance answers the next request as usual."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.lib.errors import InvalidRequestError
from appliance.lib.jsonbody import MAX_DEPTH, decode_bounded
from appliance.settings import EngineRoute, GatewaySettings, IdentitySettings, ServerSettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import admin_headers, tenant_with_key

Client = AsyncTestClient[Any]


async def started(
    tmp_path: Path, fake_engine: FakeEngine, server: ServerSettings, **more: Any
) -> AsyncIterator[tuple[Client, Settings, dict[str, Any]]]:
    """The app in front of the fake engine (chat and embeddings), with a tenant and its key."""
    settings = Settings(
        data_dir=tmp_path,
        server=server,
        gateway=GatewaySettings(
            routes=[
                EngineRoute(model="fake", url=fake_engine.url),
                EngineRoute(model="minilm-l6-v2", url=fake_engine.url, runner="pooling"),
            ]
        ),
        **more,
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        tenant = await tenant_with_key(client, admin_headers(settings), "acme")
        yield client, settings, tenant


@pytest.fixture
async def app(tmp_path: Path, fake_engine: FakeEngine) -> AsyncIterator[tuple[Client, Settings, dict[str, Any]]]:
    async for started_app in started(tmp_path, fake_engine, ServerSettings(max_body_bytes=256 * 1024)):
        yield started_app


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 900, 100_000])
async def test_deeply_nested_json_is_400_everywhere(app: tuple[Client, Settings, dict[str, Any]], depth: int) -> None:
    client, settings, tenant = app
    collection = (await client.post("/v1/rag/collections", json={"name": "c"}, headers=tenant["headers"])).json()
    targets = [
        ("/v1/chat/completions", tenant["headers"], '{"model":"fake","messages":[],"x":NEST}'),
        ("/v1/embeddings", tenant["headers"], '{"model":"minilm-l6-v2","input":NEST}'),
        ("/v1/rag/query", tenant["headers"], f'{{"collection_id":"{collection["id"]}","query":NEST}}'),
        ("/v1/rag/chat", tenant["headers"], f'{{"collection_id":"{collection["id"]}","messages":NEST}}'),
        ("/admin/tenants", admin_headers(settings), '{"name":NEST}'),
        ("/admin/budgets/", admin_headers(settings), '{"scope_type":NEST}'),
    ]
    for path, headers, template in targets:
        body = template.replace("NEST", nested(depth))
        response = await client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "json_too_deep"), path
    answer = await client.post(
        "/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        headers=tenant["headers"],
    )
    assert answer.status_code == 200, answer.text


async def test_nesting_within_the_limit_is_accepted(app: tuple[Client, Settings, dict[str, Any]]) -> None:
    client, settings, _tenant = app
    # A value nested to the limit decodes; the handler then judges it as usual (a tenant name must be a string).
    assert decode_bounded(nested(MAX_DEPTH).encode()) is not None
    response = await client.post(
        "/admin/tenants",
        content='{"name":' + nested(MAX_DEPTH - 1) + "}",
        headers={**admin_headers(settings), "Content-Type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] != "json_too_deep"
    with pytest.raises(InvalidRequestError):
        decode_bounded(nested(MAX_DEPTH + 1).encode())


async def test_bodies_past_the_limit_are_413_on_every_area(app: tuple[Client, Settings, dict[str, Any]]) -> None:
    client, settings, tenant = app
    big = b"x" * (300 * 1024)
    for path, headers, content_type in (
        ("/v1/chat/completions", tenant["headers"], "application/json"),
        ("/admin/tenants", admin_headers(settings), "application/json"),
        ("/oidc/token", {}, "application/x-www-form-urlencoded"),
        ("/oidc/authorize", {}, "application/x-www-form-urlencoded"),
    ):
        response = await client.post(path, content=big, headers={**headers, "Content-Type": content_type})
        assert response.status_code == 413, (path, response.text)
        assert response.json()["error"]["code"] == "request_too_large", path
        # The rest of such a body is not read to keep the connection: it is closed.
        assert response.headers["connection"] == "close", path


@pytest.fixture
async def paced_app(tmp_path: Path, fake_engine: FakeEngine) -> AsyncIterator[tuple[Client, Settings, dict[str, Any]]]:
    """At most 3 paced refusals per address, then each is held 2 s (what is not held takes far less)."""
    server = ServerSettings(max_body_bytes=256 * 1024, paced_refusals_per_address=3)
    async for started_app in started(tmp_path, fake_engine, server, identity=IdentitySettings(refusal_delay_s=2.0)):
        yield started_app


async def timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def test_a_flood_of_hostile_bodies_is_answered_slowly_past_the_limit_and_other_requests_are_not(
    paced_app: tuple[Client, Settings, dict[str, Any]],
) -> None:
    """The floods of bench/floods.py, cut short: nested and oversized bodies from one address are refused at once
    up to the limit, then each refusal is held (still the same refusal); the same client's valid requests and
    refusals of other kinds are answered at once all along."""
    client, _settings, tenant = paced_app
    headers = {**tenant["headers"], "Content-Type": "application/json"}
    deep = '{"model":"fake","messages":' + nested(1000) + "}"
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    for content in (deep, deep, "x" * (300 * 1024)):
        response, took = await timed(client.post("/v1/chat/completions", content=content, headers=headers))
        assert response.status_code in (400, 413) and took < 1.5, (response.text, took)
    for content, status in ((deep, 400), ("x" * (300 * 1024), 413), (deep, 400)):
        response, took = await timed(client.post("/v1/chat/completions", content=content, headers=headers))
        assert response.status_code == status and took >= 2.0, (response.status_code, took)
        assert response.json()["error"]["code"] in ("json_too_deep", "request_too_large")
        answer, took = await timed(client.post("/v1/chat/completions", json=chat, headers=tenant["headers"]))
        assert answer.status_code == 200 and took < 1.5, (answer.text, took)
        # A refusal of another kind (not JSON at all) is not held either.
        broken, took = await timed(client.post("/v1/chat/completions", content="{", headers=headers))
        assert broken.status_code == 400 and took < 1.5, (broken.text, took)


async def test_refusals_of_full_ingestion_slots_are_paced_too(
    paced_app: tuple[Client, Settings, dict[str, Any]],
) -> None:
    client, _settings, tenant = paced_app
    collection = (await client.post("/v1/rag/collections", json={"name": "c"}, headers=tenant["headers"])).json()
    path = f"/v1/rag/collections/{collection['id']}/documents"
    tenant_id = tenant["tenant"]["id"]
    service = client.app.dependencies["retrieval"].dependency()
    with ExitStack() as slots:  # every slot of the tenant taken, as by uploads in progress
        for _ in range(service._settings.max_ingestions_per_tenant):
            slots.enter_context(service.ingestion_slot(tenant_id))
        tooks = []
        for _ in range(4):
            response, took = await timed(
                client.post(path, content=b"some text", headers={**tenant["headers"], "Content-Type": "text/plain"})
            )
            assert response.status_code == 429 and response.json()["error"]["code"] == "too_many_ingestions"
            tooks.append(took)
    assert max(tooks[:3]) < 1.5 and tooks[3] >= 2.0, tooks

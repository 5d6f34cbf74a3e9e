"""Tenants never share the engines' prefix cache: every request the gateway forwards to an engine carries a
salt of its tenant (vLLM keys cached blocks by it), the same for one tenant, different across tenants, and
not one a client could compute."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.settings import EngineRoute
from tests.support import fake_engine as fake
from tests.support.gateway import admin_headers, fake_settings, tenant_with_key


def _forwarded(content: str) -> list[dict[str, Any]]:
    served = fake.COMPLETIONS_SERVED + fake.EMBEDDINGS_SERVED
    return [body for body in served if content in (fake._behaviour(body), body.get("input"))]


async def test_each_tenant_gets_its_own_unguessable_cache_salt(tmp_path: Path, fake_engine: fake.FakeEngine) -> None:
    settings = fake_settings(tmp_path, fake_engine)
    routes = [*settings.gateway.routes, EngineRoute(model="embed", url=fake_engine.url, runner="pooling")]
    settings.gateway.routes = routes
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        first = await tenant_with_key(client, admin, "first")
        second = await tenant_with_key(client, admin, "second")
        for who, tag in ((first, "a"), (first, "b"), (second, "c")):
            chat = {"model": "fake", "messages": [{"role": "user", "content": f"salt-{tag}"}]}
            assert (await client.post("/v1/chat/completions", json=chat, headers=who["headers"])).status_code == 200
            streamed = {"model": "fake", "prompt": f"salt-{tag}", "stream": True}
            assert (await client.post("/v1/completions", json=streamed, headers=who["headers"])).status_code == 200
            embed = {"model": "embed", "input": f"salt-{tag}"}
            assert (await client.post("/v1/embeddings", json=embed, headers=who["headers"])).status_code == 200
    salts = {tag: {body.get("cache_salt") for body in _forwarded(f"salt-{tag}")} for tag in "abc"}
    assert all(len(_forwarded(f"salt-{tag}")) == 3 for tag in "abc")  # chat, completions, embeddings
    assert all(len(found) == 1 and None not in found for found in salts.values()), salts
    assert salts["a"] == salts["b"], "one tenant's requests share its prefix cache"
    assert salts["a"] != salts["c"], "two tenants never share one"
    [salt] = salts["a"]
    assert isinstance(salt, str)
    tenant_id = first["tenant"]["id"]
    assert tenant_id not in salt and salt != hashlib.sha256(tenant_id.encode()).hexdigest()
    assert len(salt) <= 128 and not set(salt) & set("@/\\\x00")  # what vLLM accepts


async def test_a_tenants_salt_is_kept_across_restarts(tmp_path: Path, fake_engine: fake.FakeEngine) -> None:
    settings = fake_settings(tmp_path, fake_engine)
    salts = []
    for attempt in range(2):
        async with AsyncTestClient(app=create_app(settings)) as client:
            admin = admin_headers(settings)
            if attempt == 0:
                tenant = await tenant_with_key(client, admin, "kept")
            chat = {"model": "fake", "messages": [{"role": "user", "content": f"kept-{attempt}"}]}
            assert (await client.post("/v1/chat/completions", json=chat, headers=tenant["headers"])).status_code == 200
        [body] = _forwarded(f"kept-{attempt}")
        salts.append(body["cache_salt"])
    assert salts[0] == salts[1], "a restart does not throw the tenants' cached prefixes away"

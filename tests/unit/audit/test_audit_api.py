"""What the appliance records, who may read it, and that no secret ends up in it."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.audit.proofs import check_proof
from appliance.identity.setup import bootstrap, bootstrap_password_file, embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import add_tenant
from tests.support.records import committed

Client = AsyncTestClient[Any]


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    return Settings(data_dir=tmp_path, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)]))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.follow_redirects = False
        yield test_client


def auth(settings: Settings, *roles: str, tenant: str | None = None) -> dict[str, str]:
    token = embedded_issuer(settings).mint("alice", client_id="appliance-console", roles=list(roles), tenant_id=tenant)
    return {"Authorization": f"Bearer {token}"}


async def records(client: Client, settings: Settings, **query: str) -> list[dict[str, Any]]:
    response = await client.get("/admin/audit/", params=query, headers=auth(settings, "auditor"))
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


async def test_admin_actions_are_recorded_before_they_are_acknowledged(client: Client, settings: Settings) -> None:
    created = await client.post("/admin/tenants", json={"name": "acme"}, headers=auth(settings, "admin"))
    assert created.status_code == 201
    [record] = await records(client, settings, event_type="admin.tenants.create")
    assert (record["outcome"], record["subject"], record["object_id"]) == ("success", "alice", created.json()["id"])
    assert record["request_id"] == created.headers["x-request-id"]
    assert record["source_ip"] and record["node"] and record["ts"].endswith("Z")
    duplicate = await client.post("/admin/tenants", json={"name": "acme"}, headers=auth(settings, "admin"))
    assert duplicate.status_code == 409
    assert [r["outcome"] for r in await records(client, settings, event_type="admin.tenants.create")] == [
        "failure",
        "success",
    ]


async def test_refusals_are_recorded(client: Client, settings: Settings) -> None:
    assert (await client.get("/admin/tenants")).status_code == 401
    assert (await client.get("/admin/tenants", headers=auth(settings, "user"))).status_code == 403
    refused = await records(client, settings, event_type="access.refused")
    assert sorted((r["outcome"], r["detail"]["status"], r["subject"]) for r in refused) == [
        ("denied", 401, None),
        ("denied", 403, "alice"),
    ]


async def test_inference_requests_are_recorded_with_their_tokens(client: Client, settings: Settings) -> None:
    add_tenant(settings, "t1")
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post("/v1/chat/completions", json=body, headers=auth(settings, "user", tenant="t1"))
    assert response.status_code == 200
    [record] = await records(client, settings, event_type="inference.completions")
    assert record["request_id"] == response.headers["x-request-id"]
    assert (record["tenant_id"], record["object_id"], record["detail"]["completion_tokens"]) == ("t1", "fake", 4)
    streamed = await client.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=auth(settings, "user", tenant="t1")
    )
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    assert len(await records(client, settings, event_type="inference.completions")) == 2


async def test_sign_ins_are_recorded(client: Client, settings: Settings) -> None:
    bootstrap(settings)
    password = bootstrap_password_file(settings).read_text().strip()
    params = {
        "client_id": "appliance-console",
        "redirect_uri": "http://127.0.0.1:8080/console/callback",
        "response_type": "code",
        "code_challenge": "A" * 43,
        "code_challenge_method": "S256",
    }
    await client.post("/oidc/authorize", data={**params, "username": "admin", "password": "wrong"})
    await client.post("/oidc/authorize", data={**params, "username": "admin", "password": password})
    outcomes = [(r["outcome"], r["subject"]) for r in await records(client, settings, event_type="auth.sign_in")]
    assert outcomes == [("success", "admin"), ("failure", "admin")]


async def test_only_auditors_and_admins_read_the_trail(client: Client, settings: Settings) -> None:
    for roles, status in ((("auditor",), 200), (("admin",), 200), (("user",), 403), (("operator",), 403)):
        assert (await client.get("/admin/audit/", headers=auth(settings, *roles))).status_code == status
    verify = await client.get("/admin/audit/verify", headers=auth(settings, "auditor"))
    assert verify.status_code == 200 and verify.json()["ok"] is True


async def test_no_secret_reaches_the_audit_trail(client: Client, settings: Settings) -> None:
    admin = auth(settings, "admin")
    tenant = (await client.post("/admin/tenants", json={"name": "acme"}, headers=admin)).json()
    workflow = (
        await client.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin)
    ).json()
    key = (await client.post("/admin/api-keys", json={"workflow_id": workflow["id"]}, headers=admin)).json()["key"]
    secret = (await client.post("/admin/service-clients", json={"workflow_id": workflow["id"]}, headers=admin)).json()
    await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    await client.get("/v1/models", headers={"Authorization": f"Bearer {key}x"})
    await committed(client.app)
    dump = "\n".join(
        str(row)
        for row in sqlite3.connect(Path(settings.data_dir) / "appliance.db").execute("SELECT * FROM audit_records")
    )
    # apk_<hex id>_<secret>: the secret itself may hold "_" (URL-safe base64), so split off the id only.
    assert key.split("_", 2)[2] not in dump and secret["client_secret"] not in dump
    assert "admin.api-keys.create" in dump


async def test_content_is_captured_only_for_tenants_that_enable_it_and_redacted(
    client: Client, settings: Settings
) -> None:
    admin = auth(settings, "admin")
    keys = {}
    for name, capture in (("keeps", True), ("private", False)):
        tenant = (
            await client.post("/admin/tenants", json={"name": name, "content_capture": capture}, headers=admin)
        ).json()
        workflow = (
            await client.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin)
        ).json()
        keys[name] = (await client.post("/admin/api-keys", json={"workflow_id": workflow["id"]}, headers=admin)).json()[
            "key"
        ]
    secret_text = f"my password: hunter2 and my key {keys['private']} please"
    body = {"model": "fake", "messages": [{"role": "user", "content": secret_text}]}
    ids = {}
    for name, key in keys.items():
        for stream in (False, True):
            response = await client.post(
                "/v1/chat/completions", json={**body, "stream": stream}, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200
            ids.setdefault(name, []).append(response.headers["x-request-id"])
    await committed(client.app)
    rows = (
        sqlite3.connect(Path(settings.data_dir) / "appliance.db")
        .execute("SELECT request_id, prompt, answer, redactions FROM audit_content ORDER BY request_id")
        .fetchall()
    )
    assert sorted(r[0] for r in rows) == sorted(ids["keeps"])
    for _rid, prompt, answer, redactions in rows:
        assert "hunter2" not in prompt and keys["private"] not in prompt and redactions == 2
        assert prompt.startswith("user: my password: [REDACTED]") and answer == "ok ok ok ok "


async def test_a_search_time_without_a_zone_is_a_clear_400_not_a_500(client: Client, settings: Settings) -> None:
    for name in ("since", "until"):
        response = await client.get(
            "/admin/audit/", params={name: "2026-01-01T00:00:00"}, headers=auth(settings, "auditor")
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == name and "time zone" in error["message"]
    zoned = await client.get(
        "/admin/audit/", params={"since": "2026-01-01T00:00:00Z"}, headers=auth(settings, "auditor")
    )
    assert zoned.status_code == 200


async def test_outside_auditors_get_the_checkpoint_and_proofs_that_verify_with_the_key_alone(
    client: Client, settings: Settings
) -> None:
    for name in ("t-one", "t-two", "t-three"):
        created = await client.post("/admin/tenants", json={"name": name}, headers=auth(settings, "admin"))
        assert created.status_code == 201
    response = await client.get("/admin/audit/checkpoint", headers=auth(settings, "auditor"))
    assert response.status_code == 200, response.text
    latest = response.json()
    assert latest["note"].startswith(f"{latest['origin']}\n{latest['tree_size']}\n")
    assert latest["vkey"].startswith(latest["origin"] + "+")

    proof = await client.get("/admin/audit/proof/inclusion", params={"seq": 1}, headers=auth(settings, "auditor"))
    assert proof.status_code == 200, proof.text
    assert check_proof(proof.json(), latest["vkey"]) is None
    beyond = await client.get(
        "/admin/audit/proof/inclusion", params={"seq": latest["tree_size"] + 1}, headers=auth(settings, "auditor")
    )
    assert beyond.status_code == 400 and "not in a tree" in beyond.json()["error"]["message"]
    if latest["tree_size"] > 1:
        consistency = await client.get(
            "/admin/audit/proof/consistency", params={"old": 1}, headers=auth(settings, "auditor")
        )
        assert consistency.status_code == 200 and check_proof(consistency.json(), latest["vkey"]) is None
    # Sizes past a 64-bit integer are refused with 400 (schemathesis found a 500 for them).
    for path, params in (
        ("/admin/audit/proof/consistency", {"old": 93340553, "size": 2322610769802062462976}),
        ("/admin/audit/proof/inclusion", {"seq": 2**64}),
        ("/admin/audit/witness", {"old": 2**64}),
    ):
        huge = await client.get(path, params=params, headers=auth(settings, "auditor"))
        assert huge.status_code == 400 and huge.json()["error"]["type"] == "invalid_request_error", (path, huge.text)
    in_range = await client.get(
        "/admin/audit/proof/consistency", params={"old": 1, "size": 2**63 - 1}, headers=auth(settings, "auditor")
    )
    assert in_range.status_code == 400, in_range.text  # past the tree: refused, never a 500
    witness = await client.get("/admin/audit/witness", params={"old": 0}, headers=auth(settings, "auditor"))
    assert witness.status_code == 200 and witness.headers["content-type"].startswith("text/plain")
    assert witness.text == f"old 0\n\n{latest['note']}"

    witnessed = await client.get("/admin/audit/witnessed", headers=auth(settings, "auditor"))
    assert witnessed.status_code == 200 and witnessed.json() == []  # no witness is trusted in these settings

    for headers in (auth(settings, "user"), auth(settings, "auditor", tenant="t1")):
        for path in (
            "/admin/audit/checkpoint",
            "/admin/audit/proof/inclusion?seq=1",
            "/admin/audit/witness",
            "/admin/audit/witnessed",
        ):
            assert (await client.get(path, headers=headers)).status_code == 403, path
    assert (await client.get("/admin/audit/checkpoint")).status_code == 401

"""The embedded issuer's flows through the real app: sign-in with PKCE, client credentials, rate limiting."""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from litestar.testing import AsyncTestClient

from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.setup import bootstrap, bootstrap_password_file
from appliance.settings import Settings
from tests.unit.identity.conftest import bearer

Client = AsyncTestClient[Any]
REDIRECT = "http://127.0.0.1:8080/console/callback"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str, **overrides: str) -> dict[str, str]:
    params = {
        "client_id": "appliance-console",
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "xyz",
    }
    params.update(overrides)
    return params


@pytest.fixture
def admin_password(settings: Settings) -> str:
    assert bootstrap(settings) is True
    path = bootstrap_password_file(settings)
    assert path.stat().st_mode & 0o777 == 0o600
    return path.read_text().strip()


async def sign_in(client: Client, challenge: str, password: str, **extra: str) -> Any:
    return await client.post(
        "/oidc/authorize", data={**authorize_params(challenge), "username": "admin", "password": password, **extra}
    )


async def test_bootstrap_admin_signs_in_once_with_the_one_time_password_then_must_change_it(
    client: Client, settings: Settings, admin_password: str
) -> None:
    assert bootstrap(settings) is False, "the bootstrap admin is made once"
    verifier, challenge = pkce()
    page = await client.get("/oidc/authorize", params=authorize_params(challenge))
    assert page.status_code == 200 and 'name="password"' in page.text
    first = await sign_in(client, challenge, admin_password)
    assert first.status_code == 200 and 'name="new_password"' in first.text
    too_short = await sign_in(client, challenge, admin_password, new_password="short")
    assert too_short.status_code == 400
    done = await sign_in(client, challenge, admin_password, new_password="a much better passphrase")
    assert done.status_code == 303
    assert not bootstrap_password_file(settings).exists()
    location = urlparse(done.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["xyz"]

    form = {
        "grant_type": "authorization_code",
        "code": query["code"][0],
        "redirect_uri": REDIRECT,
        "client_id": "appliance-console",
        "code_verifier": verifier,
    }
    token = await client.post("/oidc/token", data=form)
    assert token.status_code == 200, token.text
    access = token.json()["access_token"]
    assert (await client.get("/admin/tenants", headers=bearer(access))).status_code == 200
    replay = await client.post("/oidc/token", data=form)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    # The one-time password is spent.
    assert (await sign_in(client, challenge, admin_password)).status_code == 401


async def test_code_with_a_wrong_verifier_or_redirect_is_refused(client: Client, admin_password: str) -> None:
    _verifier, challenge = pkce()
    done = await sign_in(client, challenge, admin_password, new_password="a much better passphrase")
    code = parse_qs(urlparse(done.headers["location"]).query)["code"][0]
    wrong, _ = pkce()
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "appliance-console",
        "code_verifier": wrong,
    }
    response = await client.post("/oidc/token", data=form)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "evil"},
        {"redirect_uri": "https://evil.example/steal"},
        {"code_challenge_method": "plain"},
        {"code_challenge": ""},
        {"response_type": "token"},
    ],
)
async def test_bad_authorize_requests_are_refused_without_redirecting(
    client: Client, overrides: dict[str, str]
) -> None:
    _, challenge = pkce()
    response = await client.get("/oidc/authorize", params=authorize_params(challenge, **overrides))
    assert response.status_code == 400 and "location" not in response.headers
    assert response.json()["error"] in {"invalid_client", "invalid_request", "unsupported_response_type"}


async def test_failed_sign_ins_are_rate_limited(client: Client, admin_password: str) -> None:
    _, challenge = pkce()
    for _ in range(5):
        assert (await sign_in(client, challenge, "wrong password")).status_code == 401
    limited = await sign_in(client, challenge, admin_password)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0


async def test_service_client_gets_tokens_with_client_credentials(
    client: Client, issuer: EmbeddedIssuer, settings: Settings
) -> None:
    admin = bearer(issuer.mint("root", client_id="appliance-console", roles=["admin"]))
    tenant = (await client.post("/admin/tenants", json={"name": "acme"}, headers=admin)).json()
    workflow = (
        await client.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin)
    ).json()
    created = await client.post("/admin/service-clients", json={"workflow_id": workflow["id"]}, headers=admin)
    assert created.status_code == 201
    client_id, secret = created.json()["client_id"], created.json()["client_secret"]
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    token = await client.post(
        "/oidc/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert token.status_code == 200
    access = token.json()["access_token"]
    assert (await client.get("/v1/models", headers=bearer(access))).status_code == 200
    assert (await client.get("/admin/tenants", headers=bearer(access))).status_code == 403
    wrong = await client.post(
        "/oidc/token", data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": "nope"}
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    for garbled in ("Basic %%%", "Basic " + base64.b64encode(b"\xff\xfe:x").decode()):  # not base64, not UTF-8
        refused = await client.post(
            "/oidc/token", data={"grant_type": "client_credentials"}, headers={"Authorization": garbled}
        )
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client", refused.text
    await client.delete(f"/admin/service-clients/{client_id}", headers=admin)
    revoked = await client.post(
        "/oidc/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert revoked.status_code == 401


def test_signing_key_and_pepper_files_are_private(settings: Settings, issuer: EmbeddedIssuer) -> None:
    from appliance.identity.setup import key_hasher

    key_hasher(settings)
    for name in ("issuer-key.pem", "api-key-pepper"):
        assert (Path(settings.secrets_dir) / name).stat().st_mode & 0o777 == 0o600

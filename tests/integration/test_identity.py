"""Identity through the real gateway with the openai SDK: keys, tokens from the embedded issuer, roles."""

from __future__ import annotations

import base64
import json

import aiohttp
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from openai import OpenAI

from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.setup import embedded_issuer
from appliance.identity.signing import SigningKey
from appliance.settings import Settings
from tests.integration.conftest import CHAT_MODEL, Appliance
from tests.unit.identity.conftest import claims, hand_made, public_pem, signed

pytestmark = pytest.mark.integration


def sdk(appliance: Appliance, credential: str) -> OpenAI:
    return OpenAI(base_url=appliance.gateway_url + "/v1", api_key=credential, max_retries=0, timeout=60)


def integration_tenant(appliance: Appliance) -> str:
    """The id of the integration tenant (a `user` token without a tenant is refused on /v1)."""
    made = appliance.cli("admin", "create-key", "--tenant", "integration", "--workflow", "tests", "--create")
    assert made.returncode == 0, made.stderr
    return str(json.loads(made.stdout)["tenant_id"])


def cli_token(appliance: Appliance, *args: str) -> str:
    result = appliance.cli("admin", "token", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def test_no_credential_no_answer(appliance: Appliance) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            appliance.gateway_url + "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_credentials"


@pytest.mark.parametrize("credential", ["sk-not-ours", "apk_0123456789abcdef0123_" + "A" * 43, "e30.e30.e30"])
def test_no_valid_credential_no_answer(appliance: Appliance, credential: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(appliance, credential).chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert info.value.response.json()["error"]["type"] == "authentication_error"


def test_usage_is_attributed_to_the_keys_tenant_workflow_and_agent(client: OpenAI, appliance: Appliance) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    row = appliance.usage_row(raw.headers["x-request-id"])
    assert row["tenant_id"].startswith("ten_") and row["workflow_id"].startswith("wf_")
    assert row["agent_id"].startswith("agt_") and row["api_key_id"] == row["subject"]


async def test_admin_token_from_the_cli_manages_keys_and_revocation_is_immediate(appliance: Appliance) -> None:
    admin = cli_token(appliance, "--role", "admin", "--ttl", "5m")
    created = json.loads(appliance.cli("admin", "create-key", "--tenant", "integration", "--workflow", "tests").stdout)
    key_client = sdk(appliance, created["key"])
    assert key_client.models.list().data
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
        async with session.delete(f"{appliance.gateway_url}/admin/api-keys/{created['id']}") as response:
            assert response.status == 200
    with pytest.raises(openai.AuthenticationError):
        key_client.models.list()


async def test_a_user_token_runs_models_but_not_admin_routes(appliance: Appliance) -> None:
    user = cli_token(appliance, "--role", "user", "--tenant", integration_tenant(appliance))
    assert sdk(appliance, user).models.list().data
    with pytest.raises(openai.PermissionDeniedError, match="bound to no tenant"):
        sdk(appliance, cli_token(appliance, "--role", "user")).models.list()  # no tenant, no tenant data
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {user}"}) as session:
        async with session.get(f"{appliance.gateway_url}/admin/tenants") as response:
            assert response.status == 403
            assert (await response.json())["error"]["type"] == "permission_error"


def forged_tokens(appliance: Appliance) -> dict[str, str]:
    """Tokens an attacker could present, made with local access to the running appliance's issuer key
    (the strongest position short of owning the node) or without it."""
    settings = Settings(data_dir=appliance.data_dir, server={"port": int(appliance.gateway_url.rsplit(":", 1)[1])})
    issuer = embedded_issuer(settings)
    good = signed(issuer, claims(issuer, realm_access={"roles": ["user"]}, tenant=integration_tenant(appliance)))
    header, _, signature = good.split(".")
    edited = base64.urlsafe_b64encode(json.dumps(claims(issuer)).encode()).rstrip(b"=").decode()
    foreign = EmbeddedIssuer(
        SigningKey(ec.generate_private_key(ec.SECP256R1())),
        issuer=issuer.issuer,
        audience=issuer.audience,
        default_ttl_s=60,
    )
    return {
        "valid": good,
        "expired": signed(issuer, claims(issuer, exp=1_000_000, iat=999_000, nbf=999_000)),
        "not-yet-valid": signed(issuer, claims(issuer, nbf=4_000_000_000)),
        "wrong-issuer": signed(issuer, claims(issuer, iss="http://evil.example/oidc")),
        "wrong-audience": signed(issuer, claims(issuer, aud="other-api")),
        "alg-none": hand_made({"alg": "none", "kid": issuer.key.kid}, claims(issuer), None),
        "hs256-public-key": hand_made({"alg": "HS256", "kid": issuer.key.kid}, claims(issuer), public_pem(issuer)),
        "tampered-roles": f"{header}.{edited}.{signature}",
        "unknown-kid": signed(issuer, claims(issuer), kid="nope"),
        "foreign-key": signed(foreign, claims(issuer), kid=issuer.key.kid),
    }


def test_forged_and_stale_tokens_are_refused_by_the_running_gateway(appliance: Appliance) -> None:
    tokens = forged_tokens(appliance)
    assert sdk(appliance, tokens.pop("valid")).models.list().data, "the control case is accepted"
    for name, token in tokens.items():
        with pytest.raises(openai.AuthenticationError, match="Missing or invalid credentials"):
            sdk(appliance, token).models.list()
            pytest.fail(f"{name} was accepted")

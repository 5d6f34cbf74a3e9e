"""Every forged, stale or misdirected credential is refused with 401 and a message that helps no one."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from litestar.testing import AsyncTestClient

from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.signing import SigningKey
from tests.unit.identity.conftest import b64, bearer, claims, hand_made, public_pem, signed

GENERIC = "Missing or invalid credentials."


async def assert_refused(client: AsyncTestClient[Any], headers: dict[str, str]) -> None:
    for path in ("/v1/models", "/admin/tenants"):
        response = await client.get(path, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json() == {
            "error": {"message": GENERIC, "type": "authentication_error", "param": None, "code": "invalid_credentials"}
        }
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_a_valid_token_is_accepted(client: AsyncTestClient[Any], issuer: EmbeddedIssuer) -> None:
    response = await client.get("/admin/tenants", headers=bearer(signed(issuer, claims(issuer))))
    assert response.status_code == 200


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer a.b"])
async def test_missing_or_malformed_credentials(client: AsyncTestClient[Any], header: str | None) -> None:
    await assert_refused(client, {} if header is None else {"Authorization": header})


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"exp": 1_000_000, "iat": 999_000, "nbf": 999_000}, id="expired"),
        pytest.param({"nbf": 4_000_000_000}, id="not-yet-valid"),
        pytest.param({"iss": "http://evil.example/oidc"}, id="wrong-issuer"),
        pytest.param({"aud": "some-other-api"}, id="wrong-audience"),
        pytest.param({"azp": None}, id="no-azp"),
        pytest.param({"exp": None}, id="no-exp"),
        pytest.param({"sub": None}, id="no-sub"),
    ],
)
async def test_claims_that_do_not_hold(
    client: AsyncTestClient[Any], issuer: EmbeddedIssuer, overrides: dict[str, Any]
) -> None:
    await assert_refused(client, bearer(signed(issuer, claims(issuer, **overrides))))


async def test_alg_none(client: AsyncTestClient[Any], issuer: EmbeddedIssuer) -> None:
    token = hand_made({"alg": "none", "typ": "JWT", "kid": issuer.key.kid}, claims(issuer), None)
    await assert_refused(client, bearer(token))


async def test_hs256_signed_with_the_public_key(client: AsyncTestClient[Any], issuer: EmbeddedIssuer) -> None:
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.key.kid}
    for secret in (public_pem(issuer), json.dumps(issuer.key.public_jwk).encode()):
        await assert_refused(client, bearer(hand_made(header, claims(issuer), secret)))


async def test_tampered_payload_and_edited_roles(client: AsyncTestClient[Any], issuer: EmbeddedIssuer) -> None:
    token = signed(issuer, claims(issuer, realm_access={"roles": ["user"]}))
    header, _payload, signature = token.split(".")
    edited = b64(json.dumps(claims(issuer, realm_access={"roles": ["admin"]})).encode())
    await assert_refused(client, bearer(f"{header}.{edited}.{signature}"))


async def test_unknown_kid_and_a_foreign_key(client: AsyncTestClient[Any], issuer: EmbeddedIssuer) -> None:
    await assert_refused(client, bearer(signed(issuer, claims(issuer), kid="no-such-key")))
    foreign = SigningKey(ec.generate_private_key(ec.SECP256R1()))
    forged = EmbeddedIssuer(foreign, issuer=issuer.issuer, audience=issuer.audience, default_ttl_s=300)
    # Signed by another key but naming ours: the signature does not verify.
    token = signed(forged, claims(issuer), kid=issuer.key.kid)
    await assert_refused(client, bearer(token))


async def test_public_endpoints_need_no_credentials(client: AsyncTestClient[Any], issuer: EmbeddedIssuer) -> None:
    assert (await client.get("/healthz")).status_code == 200
    discovery = (await client.get("/oidc/.well-known/openid-configuration")).json()
    assert discovery["issuer"] == issuer.issuer
    jwks = (await client.get("/oidc/jwks")).json()
    assert [key["kid"] for key in jwks["keys"]] == [issuer.key.kid]
    assert "d" not in jwks["keys"][0], "the private part never leaves the node"


@pytest.mark.parametrize("alg", [["ES256"], {"a": 1}, 7, None], ids=["list", "object", "number", "null"])
async def test_an_alg_header_that_is_not_a_string_is_the_same_401(
    client: AsyncTestClient[Any], issuer: EmbeddedIssuer, alg: Any
) -> None:
    token = hand_made({"alg": alg, "typ": "JWT", "kid": issuer.key.kid}, claims(issuer), b"x")
    await assert_refused(client, bearer(token))
    kid = hand_made({"alg": "ES256", "typ": "JWT", "kid": [issuer.key.kid]}, claims(issuer), b"x")
    await assert_refused(client, bearer(kid))

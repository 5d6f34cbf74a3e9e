from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.setup import embedded_issuer
from appliance.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def issuer(settings: Settings) -> EmbeddedIssuer:
    return embedded_issuer(settings)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.follow_redirects = False
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(issuer: EmbeddedIssuer, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": issuer.issuer,
        "sub": "attacker",
        "aud": issuer.audience,
        "azp": "appliance-console",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "realm_access": {"roles": ["admin"]},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(issuer: EmbeddedIssuer, payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, issuer.key.private_key, algorithm="ES256", headers={"kid": issuer.key.kid, **headers})


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def public_pem(issuer: EmbeddedIssuer) -> bytes:
    return issuer.key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

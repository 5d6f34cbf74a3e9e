"""The embedded OIDC issuer: what plays Keycloak's part when no Keycloak is configured (``make run``).

Its tokens have Keycloak's layout (``realm_access.roles``, ``azp``, ``aud``, a ``tenant`` claim) so that
one validation path serves both."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jwt

from appliance.identity.signing import ALGORITHM, SigningKey


class EmbeddedIssuer:
    def __init__(self, key: SigningKey, *, issuer: str, audience: str, default_ttl_s: int) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.default_ttl_s = default_ttl_s

    def mint(
        self,
        subject: str,
        *,
        client_id: str,
        roles: list[str],
        tenant_id: str | None = None,
        ttl_s: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "azp": client_id,
            "iat": now,
            "nbf": now,
            "exp": now + (ttl_s or self.default_ttl_s),
            "jti": uuid.uuid4().hex,
            "realm_access": {"roles": sorted(roles)},
        }
        if tenant_id is not None:
            claims["tenant"] = tenant_id
        claims.update(extra or {})
        return jwt.encode(claims, self.key.private_key, algorithm=ALGORITHM, headers={"kid": self.key.kid})

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/jwks",
            "token_endpoint": f"{self.issuer}/token",
            "authorization_endpoint": f"{self.issuer}/authorize",
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
        }

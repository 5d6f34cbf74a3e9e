"""The embedded issuer's public OIDC endpoints: discovery and JWKS (no credentials needed)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get
from litestar.di import NamedDependency

from appliance.identity.issuer import EmbeddedIssuer


class OidcController(Controller):
    path = "/oidc"

    @get("/.well-known/openid-configuration")
    async def discovery(self, issuer: NamedDependency[EmbeddedIssuer]) -> dict[str, Any]:
        return issuer.discovery()

    @get("/jwks")
    async def jwks(self, issuer: NamedDependency[EmbeddedIssuer]) -> dict[str, Any]:
        return issuer.key.jwks()

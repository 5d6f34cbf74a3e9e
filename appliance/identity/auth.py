"""Authentication of every request to a protected path, before any handler runs (fail closed: a path is
protected unless it is listed as public here)."""

from __future__ import annotations

import logging
from typing import Any

from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.identity.apikeys import ApiKeyAuthenticator
from appliance.identity.principal import Principal
from appliance.identity.tokens import TokenValidator
from appliance.identity.users import UserMirror
from appliance.lib.errors import AuthenticationError

log = logging.getLogger(__name__)

PUBLIC_PATHS = ("/healthz", "/readyz", "/oidc/")
_STATE_KEY = "appliance_principal"


class Authenticator:
    def __init__(self, tokens: TokenValidator, api_keys: ApiKeyAuthenticator, users: UserMirror) -> None:
        self._tokens = tokens
        self._api_keys = api_keys
        self._users = users

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError()
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError()
        if credential.startswith("apk_"):
            return await self._api_keys.authenticate(credential)
        principal, claims = await self._tokens.validate(credential)
        user_id = await self._users.mirror(principal, claims)
        return Principal(**{**_fields(principal), "user_id": user_id})


def _fields(principal: Principal) -> dict[str, Any]:
    return {name: getattr(principal, name) for name in principal.__slots__}


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or any(path.startswith(p) for p in PUBLIC_PATHS if p.endswith("/"))


def principal_of(scope: Scope) -> Principal:
    principal = scope.get("state", {}).get(_STATE_KEY)
    if not isinstance(principal, Principal):
        raise AuthenticationError()  # a protected handler without an authenticated principal: refuse
    return principal


def authentication_middleware(authenticator: Authenticator) -> Any:
    """Litestar middleware factory: sets the principal in the scope, or the request ends with 401."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.HTTP and not is_public(scope["path"]):
                principal = await authenticator.authenticate(Headers.from_scope(scope).get("authorization"))
                scope.setdefault("state", {})[_STATE_KEY] = principal
            await app(scope, receive, send)

        return middleware

    return factory

"""Authentication of every request to a protected path, before any handler runs (fail closed: a path is
protected unless it is listed as public here)."""

from __future__ import annotations

import dataclasses
import logging
from http.cookies import CookieError, SimpleCookie
from typing import Any

from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from appliance.identity.accounts import AccountCheck
from appliance.identity.apikeys import ApiKeyAuthenticator
from appliance.identity.sessions import CSRF_HEADER, SESSION_COOKIE, SessionStore
from appliance.identity.tenancy import DefaultTenant, TenantCheck
from appliance.identity.tokens import TokenValidator
from appliance.identity.users import UserMirror
from appliance.lib.errors import AuthenticationError
from appliance.lib.logging import bind
from appliance.lib.principal import STATE_KEY, Principal

log = logging.getLogger(__name__)

# The console's page and its assets are public (they hold no data; the page asks /console/session who is
# signed in, and every call it makes is authenticated).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/openapi.json", "/console", "/console/", "/console/login", "/console/callback"}
)
PUBLIC_PREFIXES = ("/oidc/", "/console/assets/")


class Authenticator:
    def __init__(
        self,
        tokens: TokenValidator,
        api_keys: ApiKeyAuthenticator,
        users: UserMirror,
        sessions: SessionStore,
        default_tenant: DefaultTenant | None = None,
        tenants: TenantCheck | None = None,
        accounts: AccountCheck | None = None,
    ) -> None:
        self._tokens = tokens
        self._api_keys = api_keys
        self._users = users
        self.sessions = sessions
        self._default_tenant = default_tenant
        self._tenants = tenants
        self._accounts = accounts

    async def authenticate(
        self,
        authorization: str | None,
        *,
        session_cookie: str | None = None,
        method: str = "GET",
        csrf_token: str | None = None,
        address: str | None = None,
    ) -> Principal:
        """A bearer credential (JWT or API key) or, failing that, a console session cookie; a tenant-less
        `user` is bound to the default tenant where one is configured; a tenant that does not exist is refused.
        ``address`` is the client's: an address that sent many unknown API keys lately is refused without a
        database read."""
        principal = await self._credential(authorization, session_cookie, method, csrf_token, address)
        if self._default_tenant is not None:
            principal = await self._default_tenant.bind(principal)
        if self._tenants is not None:
            await self._tenants.check(principal)
        return principal

    def key_revoked(self, key_id: str) -> None:
        self._api_keys.forget(key_id)

    async def _credential(
        self,
        authorization: str | None,
        session_cookie: str | None,
        method: str,
        csrf_token: str | None,
        address: str | None,
    ) -> Principal:
        if not authorization:
            if session_cookie:
                return await self.sessions.authenticate(session_cookie, method, csrf_token)
            raise AuthenticationError()
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthenticationError()
        if credential.startswith("apk_"):
            return await self._api_keys.authenticate(credential, address)
        return await self.from_token(credential)

    async def from_token(self, token: str) -> Principal:
        principal, claims = await self._tokens.validate(token)
        if self._accounts is not None:
            principal = await self._accounts.apply(principal)
        user_id = await self._users.mirror(principal, claims)
        return dataclasses.replace(principal, user_id=user_id, username=_username(claims, principal))


def _username(claims: dict[str, Any], principal: Principal) -> str:
    return str(claims.get("preferred_username") or principal.subject)


def _cookie(header: str | None, name: str) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def authentication_middleware(authenticator: Authenticator) -> Any:
    """Litestar middleware factory: sets the principal in the scope, or the request ends with 401."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == ScopeType.HTTP and not is_public(scope["path"]):
                headers = Headers.from_scope(scope)
                client = scope.get("client")
                principal = await authenticator.authenticate(
                    headers.get("authorization"),
                    session_cookie=_cookie(headers.get("cookie"), SESSION_COOKIE),
                    method=scope["method"],
                    csrf_token=headers.get(CSRF_HEADER),
                    address=client[0] if client else None,
                )
                scope.setdefault("state", {})[STATE_KEY] = principal
                bind(tenant=principal.tenant_id, workflow=principal.workflow_id)
            await app(scope, receive, send)

        return middleware

    return factory

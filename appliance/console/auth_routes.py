"""Console sign-in as a backend-for-frontend: the browser never holds an access token, only an HttpOnly,
Secure, SameSite=Strict session cookie; the server does the authorization-code + PKCE exchange with the
embedded issuer or Keycloak."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from litestar import Controller, Request, Response, Router, get, post
from litestar.datastructures import Cookie, State
from litestar.di import NamedDependency
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.audit.middleware import base_event
from appliance.audit.writer import AuditWriter
from appliance.identity import oauth
from appliance.identity.auth import Authenticator
from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.sessions import SESSION_COOKIE
from appliance.lib.errors import AuthenticationError
from appliance.lib.guards import CONSOLE_SESSION, SIGNED_IN
from appliance.settings import Settings

Req = Request[Any, Any, State]
STATIC_DIR = Path(__file__).parent / "static"
# Nothing the page loads may come from anywhere but this appliance (an air-gapped site has no CDN).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@lru_cache(maxsize=1)
def console_page() -> bytes:
    return (STATIC_DIR / "index.html").read_bytes()


def console_assets() -> Router:
    """The console's scripts and styles, written here (no build step, no third-party code)."""

    async def secured(response: Response[Any]) -> Response[Any]:
        response.headers.update(SECURITY_HEADERS)
        return response

    return create_static_files_router(
        path="/console/assets", directories=[STATIC_DIR], after_request=secured, include_in_schema=False
    )


LOGIN_COOKIE = "appliance_login"
LOGIN_COOKIE_S = 600
_NO_STORE = {"Cache-Control": "no-store"}


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _endpoints(settings: Settings) -> tuple[str, str]:
    """(authorization endpoint, token endpoint) of the configured issuer."""
    issuer = settings.issuer_url
    if settings.identity.keycloak_url:
        return f"{issuer}/protocol/openid-connect/auth", f"{issuer}/protocol/openid-connect/token"
    return f"{issuer}/authorize", f"{issuer}/token"


def _cookie(name: str, value: str, max_age: int, same_site: str) -> Cookie:
    return Cookie(
        key=name,
        value=value,
        max_age=max_age,
        path="/",
        httponly=True,
        secure=True,
        samesite=same_site,  # type: ignore[arg-type]
    )


class ConsoleAuthController(Controller):
    path = "/console"

    @get("/login")
    async def login(self, settings: NamedDependency[Settings]) -> Response[Any]:
        verifier, challenge = _pkce()
        state = secrets.token_urlsafe(24)
        authorize, _token = _endpoints(settings)
        query = urlencode(
            {
                "client_id": settings.identity.console_client_id,
                "redirect_uri": settings.console_redirect_uris[0],
                "response_type": "code",
                "scope": "openid",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "state": state,
            }
        )
        # Lax, not Strict: the way back from the issuer may be a cross-site navigation (Keycloak on its own host).
        cookie = _cookie(LOGIN_COOKIE, f"{state}.{verifier}", LOGIN_COOKIE_S, "lax")
        return Redirect(f"{authorize}?{query}", status_code=303, cookies=[cookie], headers=_NO_STORE)

    @get("/callback")
    async def callback(
        self,
        request: Req,
        settings: NamedDependency[Settings],
        authenticator: NamedDependency[Authenticator],
        issuer: NamedDependency[EmbeddedIssuer | None],
        db_engine: NamedDependency[Engine],
        audit: NamedDependency[AuditWriter],
    ) -> Response[Any]:
        state, _, verifier = request.cookies.get(LOGIN_COOKIE, "").partition(".")
        if not state or not hmac.compare_digest(state, request.query_params.get("state", "")):
            raise AuthenticationError("The sign-in expired or did not start here; sign in again.")
        form = {
            "grant_type": "authorization_code",
            "code": request.query_params.get("code", ""),
            "redirect_uri": settings.console_redirect_uris[0],
            "client_id": settings.identity.console_client_id,
            "code_verifier": verifier,
        }
        token = await _exchange(settings, issuer, db_engine, form)
        principal = await authenticator.from_token(token)
        session_id = await asyncio.to_thread(authenticator.sessions.create, principal)
        await audit.record(
            base_event(
                request.scope,
                "auth.console_session",
                "success",
                component="console",
                subject=principal.subject,
                subject_kind=principal.kind,
                tenant_id=principal.tenant_id,
            )
        )
        max_age = int(authenticator.sessions.lifetime.total_seconds())
        # An HTML hop to the console: after a cross-site redirect the browser would not send the new Strict
        # cookie on the next navigation; from this same-site page it does.
        page = '<!doctype html><meta http-equiv="refresh" content="0;url=/console/"><a href="/console/">Continue</a>'
        return Response(
            content=page,
            media_type="text/html",
            headers=_NO_STORE,
            cookies=[_cookie(SESSION_COOKIE, session_id, max_age, "strict"), _cookie(LOGIN_COOKIE, "", 0, "lax")],
        )

    @get("/", include_in_schema=False)
    async def page(self) -> Response[bytes]:
        """The console's single page; scripts, styles and data all come from this appliance."""
        return Response(content=console_page(), media_type="text/html", headers={**_NO_STORE, **SECURITY_HEADERS})

    @get("/session", guards=[CONSOLE_SESSION])
    async def session(self, request: Req, authenticator: NamedDependency[Authenticator]) -> dict[str, Any]:
        """Who is signed in, and the CSRF token the console sends with every change."""
        row = await asyncio.to_thread(authenticator.sessions.get, request.cookies.get(SESSION_COOKIE, ""))
        if row is None:
            raise AuthenticationError()
        return {
            "username": row.username,
            "roles": row.roles,
            "tenant_id": row.tenant_id,
            "csrf_token": row.csrf_token,
            "expires_at": row.expires_at.isoformat(),
        }

    @post("/logout", status_code=200, guards=[SIGNED_IN])  # the middleware checked the session and its CSRF token
    async def logout(self, request: Req, authenticator: NamedDependency[Authenticator]) -> Response[Any]:
        await asyncio.to_thread(authenticator.sessions.end, request.cookies.get(SESSION_COOKIE, ""))
        return Response(content={"signed_out": True}, cookies=[_cookie(SESSION_COOKIE, "", 0, "strict")])


async def _exchange(settings: Settings, issuer: EmbeddedIssuer | None, engine: Engine, form: dict[str, str]) -> str:
    if issuer is not None:

        def embedded() -> str:
            with Session(engine) as db:
                return str(oauth.exchange_code(db, issuer, form)["access_token"])

        try:
            return await asyncio.to_thread(embedded)
        except oauth.OAuthError:
            raise AuthenticationError("The sign-in could not be completed; sign in again.") from None
    _authorize, token_url = _endpoints(settings)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.post(token_url, data=form) as response:
            if response.status != 200:
                raise AuthenticationError("The sign-in could not be completed; sign in again.")
            body: dict[str, Any] = await response.json()
    return str(body["access_token"])

"""The embedded issuer's endpoints: discovery, JWKS, the sign-in page (authorization code + PKCE) and the
token endpoint. They need no bearer credential: they are how one is obtained."""

from __future__ import annotations

import asyncio
import base64
import html
from functools import cache
from pathlib import Path
from string import Template
from typing import Any
from urllib.parse import urlencode

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.response import Redirect
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.audit.digest import RefusalDigest
from appliance.audit.store import AuditEvent
from appliance.audit.writer import AuditWriter
from appliance.identity import oauth
from appliance.identity.accounts import LoginLimiter, PasswordWork, check_password
from appliance.identity.apikeys import KeyHasher
from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.setup import bootstrap_password_file
from appliance.lib.errors import RateLimitedError
from appliance.lib.http import request_id
from appliance.settings import Settings

Req = Request[Any, Any, State]
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_PAGE_HEADERS = {
    **_NO_STORE,
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
}


@cache
def _login_template() -> Template:
    return Template((Path(__file__).parent / "templates" / "login.html").read_text(encoding="utf-8"))


def _oauth_error(exc: oauth.OAuthError) -> Response[Any]:
    return Response(content=exc.body(), status_code=exc.status_code, headers=_NO_STORE)


_CHANGE_FIELDS_HTML = """<label for="new_password">New password (at least 12 characters)</label>
<input id="new_password" name="new_password" type="password" autocomplete="new-password" minlength="12" required>"""


def _login_page(
    request: oauth.AuthorizeRequest, message: str = "", status_code: int = 200, *, change_password: bool = False
) -> Response[str]:
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value)}">'
        for name, value in (
            ("client_id", request.client_id),
            ("redirect_uri", request.redirect_uri),
            ("response_type", "code"),
            ("code_challenge", request.code_challenge),
            ("code_challenge_method", "S256"),
            ("state", request.state),
        )
    )
    error = f'<p role="alert" class="error">{html.escape(message)}</p>' if message else ""
    page = _login_template().substitute(
        error=error, hidden=hidden, new_password=_CHANGE_FIELDS_HTML if change_password else ""
    )
    return Response(content=page, media_type="text/html", status_code=status_code, headers=_PAGE_HEADERS)


class OidcController(Controller):
    path = "/oidc"

    @get("/.well-known/openid-configuration")
    async def discovery(self, issuer: NamedDependency[EmbeddedIssuer]) -> dict[str, Any]:
        return issuer.discovery()

    @get("/jwks")
    async def jwks(self, issuer: NamedDependency[EmbeddedIssuer]) -> dict[str, Any]:
        return issuer.key.jwks()

    @get("/authorize")
    async def authorize_page(self, request: Req, settings: NamedDependency[Settings]) -> Response[Any]:
        try:
            parsed = oauth.AuthorizeRequest.parse(
                dict(request.query_params), settings.identity.console_client_id, settings.console_redirect_uris
            )
        except oauth.OAuthError as exc:
            return _oauth_error(exc)
        return _login_page(parsed)

    @post("/authorize", status_code=200)
    async def authorize(
        self,
        request: Req,
        settings: NamedDependency[Settings],
        db_engine: NamedDependency[Engine],
        login_limiter: NamedDependency[LoginLimiter],
        password_work: NamedDependency[PasswordWork],
        audit: NamedDependency[AuditWriter],
        refusals: NamedDependency[RefusalDigest],
    ) -> Response[Any]:
        address = request.client.host if request.client else "-"
        # An address past its limit (or everyone, past the global one) is refused before its form is even read:
        # a flood's refusals must cost next to nothing, and their records are digested.
        wait = login_limiter.blocked(address)
        if wait:
            await refusals.refused(_sign_in_event(request, None, "denied", "rate_limited"))
            await login_limiter.tarpit.hold()
            return _refused_page(wait)
        form = {key: str(value) for key, value in (await request.form()).items()}
        try:
            parsed = oauth.AuthorizeRequest.parse(
                form, settings.identity.console_client_id, settings.console_redirect_uris
            )
        except oauth.OAuthError as exc:
            return _oauth_error(exc)
        username = form.get("username", "")[:100]
        # Every limit is checked before the password is hashed; hashing runs on its own bounded pool.
        wait = login_limiter.admit(username, address) or (2 if password_work.full else 0)
        if wait:
            await login_limiter.tarpit.hold()
            return await _too_many(request, refusals, parsed, username, wait)
        try:
            outcome = await password_work.run(
                _sign_in, db_engine, parsed, username, form, bootstrap_password_file(settings)
            )
        except RateLimitedError as exc:
            return await _too_many(request, refusals, parsed, username, exc.retry_after)
        if isinstance(outcome, Response) and outcome.status_code == 401:
            login_limiter.failed(username, address)
            await audit.record(_sign_in_event(request, username, "failure", "wrong_credentials"))
            return outcome
        login_limiter.succeeded(username, address)
        await audit.record(_sign_in_event(request, username, "success", "password_verified"))
        if isinstance(outcome, Response):  # the password was right; a new one is still to be chosen
            return outcome
        query = urlencode({"code": outcome, "state": parsed.state} if parsed.state else {"code": outcome})
        return Redirect(f"{parsed.redirect_uri}?{query}", status_code=303, headers=_NO_STORE)

    @post("/token", status_code=200)
    async def token(
        self,
        request: Req,
        issuer: NamedDependency[EmbeddedIssuer],
        db_engine: NamedDependency[Engine],
        key_hasher: NamedDependency[KeyHasher],
        login_limiter: NamedDependency[LoginLimiter],
        audit: NamedDependency[AuditWriter],
        refusals: NamedDependency[RefusalDigest],
    ) -> Response[Any]:
        address = request.client.host if request.client else "-"
        # Past its limit of refused grants, an address is refused before its form is read or the database asked.
        wait = login_limiter.grant_blocked(address)
        if wait:
            await refusals.refused(_sign_in_event(request, None, "denied", "rate_limited", event_type="auth.token"))
            await login_limiter.tarpit.hold()
            response = _oauth_error(
                oauth.OAuthError(
                    "temporarily_unavailable",
                    f"Too many refused token requests from this address; try again in {wait} seconds.",
                    status_code=429,
                )
            )
            response.headers["Retry-After"] = str(wait)
            return response
        login_limiter.grant_attempted(address)  # refused until it succeeds, whatever happens to it meanwhile
        form = {key: str(value) for key, value in (await request.form()).items()}
        grant = form.get("grant_type", "")[:50]
        client = ("", "")
        try:
            if grant == "client_credentials":
                client = _client_auth(request, form)
            if any("\x00" in value for value in (*form.values(), *client)):  # no database takes it as text
                raise oauth.OAuthError("invalid_request", "A field carries a NUL character.")
            body = await asyncio.to_thread(_grant, db_engine, issuer, key_hasher, form, client)
        except oauth.OAuthError as exc:  # nobody was authenticated: digested, so a flood cannot flood the log
            await refusals.refused(
                _sign_in_event(request, client[0] or None, "failure", exc.error, event_type=f"auth.token.{grant}")
            )
            return _oauth_error(exc)
        login_limiter.grant_succeeded(address)
        await audit.record(
            _sign_in_event(request, client[0] or None, "success", "issued", event_type=f"auth.token.{grant}")
        )
        return Response(content=body, status_code=200, headers=_NO_STORE)


async def _too_many(
    request: Req, refusals: RefusalDigest, parsed: oauth.AuthorizeRequest, username: str, wait: int
) -> Response[Any]:
    await refusals.refused(_sign_in_event(request, username, "denied", "rate_limited"))
    response = _login_page(parsed, "Too many sign-in attempts. Try again later.", status_code=429)
    response.headers["Retry-After"] = str(wait)
    return response


def _refused_page(wait: int) -> Response[str]:
    """The answer to an address past its sign-in limit: no form (the attempt was not read), when to come back."""
    page = (
        "<!doctype html><html lang=en><meta charset=utf-8><title>Sign-in refused</title>"
        f"<p role=alert>Too many sign-in attempts from this address. Try again in {wait} seconds.</p></html>"
    )
    return Response(
        content=page,
        media_type="text/html",
        status_code=429,
        headers={**_PAGE_HEADERS, "Retry-After": str(wait)},
    )


def _sign_in_event(
    request: Req, subject: str | None, outcome: str, reason: str, *, event_type: str = "auth.sign_in"
) -> AuditEvent:
    return AuditEvent(
        event_type=event_type,
        outcome=outcome,
        component="issuer",
        subject=subject,
        subject_kind="local_account" if event_type == "auth.sign_in" else "client",
        source_ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent", "")[:300] or None,
        request_id=request_id(request.scope),
        detail={"reason": reason},
    )


def _sign_in(
    engine: Engine, parsed: oauth.AuthorizeRequest, username: str, form: dict[str, str], bootstrap_file: Path
) -> str | Response[str]:
    """(In a worker thread: argon2 takes tens of milliseconds.) The authorization code, or the page to show."""
    with Session(engine) as session:
        account = check_password(session, username, form.get("password", ""))
        if account is None:
            return _login_page(parsed, "Wrong username or password.", status_code=401)
        if account.must_change_password:
            new_password = form.get("new_password", "")
            if not new_password:
                return _login_page(parsed, "Choose a new password to finish signing in.", change_password=True)
            try:
                oauth.change_password(session, account, new_password)
            except oauth.OAuthError as exc:
                return _login_page(parsed, exc.description, status_code=400, change_password=True)
            bootstrap_file.unlink(missing_ok=True)
        return oauth.issue_code(session, parsed, account.username)


def _grant(
    engine: Engine, issuer: EmbeddedIssuer, hasher: KeyHasher, form: dict[str, str], client: tuple[str, str]
) -> dict[str, Any]:
    with Session(engine) as session:
        grant = form.get("grant_type")
        if grant == "authorization_code":
            return oauth.exchange_code(session, issuer, form)
        if grant == "client_credentials":
            return oauth.client_credentials(session, issuer, hasher, *client)
        raise oauth.OAuthError("unsupported_grant_type", "Unsupported grant_type.")


def _client_auth(request: Req, form: dict[str, str]) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise oauth.OAuthError("invalid_client", "Client authentication failed.", status_code=401) from None
        return client_id, secret
    return form.get("client_id", ""), form.get("client_secret", "")

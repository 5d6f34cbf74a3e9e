"""The embedded issuer's grants: authorization code with PKCE (people, through the console) and client
credentials (service accounts of workflows). Errors use OAuth's own format (RFC 6749 §5.2)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, delete
from sqlmodel import Session, col

from appliance.identity.accounts import check_password, hash_password
from appliance.identity.apikeys import KeyHasher
from appliance.identity.issuer import EmbeddedIssuer
from appliance.identity.models import LOCAL_SUBJECT, AuthorizationCode, LocalAccount, ServiceClient
from appliance.lib.times import as_utc

CODE_TTL = timedelta(seconds=60)
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # base64url of a SHA-256 digest
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 §4.1


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status_code: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status_code = status_code

    def body(self) -> dict[str, str]:
        return {"error": self.error, "error_description": self.description}


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    client_id: str
    redirect_uri: str
    code_challenge: str
    state: str

    @classmethod
    def parse(cls, params: dict[str, str], console_client_id: str, redirect_uris: list[str]) -> AuthorizeRequest:
        """Check the request before anything is shown: an unknown client or redirect is never redirected to."""
        if params.get("client_id") != console_client_id:
            raise OAuthError("invalid_client", "Unknown client.")
        if params.get("redirect_uri") not in redirect_uris:
            raise OAuthError("invalid_request", "This redirect URI is not registered for the client.")
        if params.get("response_type") != "code":
            raise OAuthError("unsupported_response_type", "Only the authorization code flow is supported.")
        if params.get("code_challenge_method") != "S256" or not _CHALLENGE.match(params.get("code_challenge", "")):
            raise OAuthError("invalid_request", "PKCE with code_challenge_method=S256 is required.")
        return cls(
            client_id=params["client_id"],
            redirect_uri=params["redirect_uri"],
            code_challenge=params["code_challenge"],
            state=params.get("state", "")[:500],
        )


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def issue_code(session: Session, request: AuthorizeRequest, username: str) -> str:
    code = secrets.token_urlsafe(32)
    session.add(
        AuthorizationCode(
            code_hash=_digest(code),
            client_id=request.client_id,
            redirect_uri=request.redirect_uri,
            code_challenge=request.code_challenge,
            username=username,
            expires_at=datetime.now(UTC) + CODE_TTL,
        )
    )
    session.commit()
    return code


MIN_PASSWORD_LENGTH = 12


def change_password(session: Session, account: LocalAccount, new_password: str) -> None:
    if len(new_password) < MIN_PASSWORD_LENGTH:
        raise OAuthError("invalid_request", f"The new password needs at least {MIN_PASSWORD_LENGTH} characters.")
    if check_password(session, account.username, new_password) is not None:
        raise OAuthError("invalid_request", "The new password must differ from the one-time password.")
    account.password_hash = hash_password(new_password)
    account.must_change_password = False
    session.add(account)
    session.commit()


def exchange_code(session: Session, issuer: EmbeddedIssuer, form: dict[str, str]) -> dict[str, Any]:
    code_hash = _digest(form.get("code", ""))
    stored = session.get(AuthorizationCode, code_hash)
    if stored is None:
        raise OAuthError("invalid_grant", "The code is invalid, expired or already used.")
    session.expunge(stored)
    # One use only, whatever happens next: the one DELETE that removes the row redeems the code; a racing
    # request that read the same row deletes nothing and is refused.
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        delete(AuthorizationCode).where(col(AuthorizationCode.code_hash) == code_hash)
    )
    session.commit()
    if result.rowcount != 1:
        raise OAuthError("invalid_grant", "The code is invalid, expired or already used.")
    if as_utc(stored.expires_at) < datetime.now(UTC):
        raise OAuthError("invalid_grant", "The code is invalid, expired or already used.")
    if form.get("client_id") != stored.client_id or form.get("redirect_uri") != stored.redirect_uri:
        raise OAuthError("invalid_grant", "The code was issued to another client or redirect URI.")
    verifier = form.get("code_verifier", "")
    computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    if not _VERIFIER.match(verifier) or not hmac.compare_digest(computed, stored.code_challenge):
        raise OAuthError("invalid_grant", "The PKCE code verifier does not match.")
    account = session.get(LocalAccount, stored.username)
    if account is None or account.disabled:
        raise OAuthError("invalid_grant", "The account no longer exists or is disabled.")
    token = issuer.mint(
        f"{LOCAL_SUBJECT}{account.username}",
        client_id=stored.client_id,
        roles=account.roles,
        tenant_id=account.tenant_id,
        extra={"preferred_username": account.username},
    )
    return {"access_token": token, "token_type": "Bearer", "expires_in": issuer.default_ttl_s}


def client_credentials(
    session: Session, issuer: EmbeddedIssuer, hasher: KeyHasher, client_id: str, client_secret: str
) -> dict[str, Any]:
    client = session.get(ServiceClient, client_id)
    expected = client.secret_hash if client is not None else "0" * 64
    if not hmac.compare_digest(expected, hasher.digest(client_secret)) or client is None or client.revoked_at:
        raise OAuthError("invalid_client", "Client authentication failed.", status_code=401)
    extra = {"workflow": client.workflow_id, "client_id": client.id}
    if client.agent_id:
        extra["agent"] = client.agent_id
    token = issuer.mint(
        f"service-account:{client.id}", client_id=client.id, roles=client.roles, tenant_id=client.tenant_id, extra=extra
    )
    return {"access_token": token, "token_type": "Bearer", "expires_in": issuer.default_ttl_s}


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)

"""Console sessions: an HttpOnly, Secure, SameSite=Strict cookie naming a server-side session, and a CSRF
token that every state-changing request made with that cookie must echo in ``X-CSRF-Token``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.identity.models import ConsoleSession
from appliance.identity.principal import Principal
from appliance.lib.errors import AuthenticationError, PermissionDeniedError
from appliance.lib.times import as_utc

SESSION_COOKIE = "appliance_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class SessionStore:
    def __init__(self, engine: Engine, lifetime: timedelta) -> None:
        self._engine = engine
        self.lifetime = lifetime

    def create(self, principal: Principal) -> str:
        """A new session; returns the cookie value, which is never stored (only its hash is)."""
        session_id = secrets.token_urlsafe(32)
        row = ConsoleSession(
            id_hash=_digest(session_id),
            subject=principal.subject,
            username=principal.username or principal.subject,
            roles=sorted(principal.roles),
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=datetime.now(UTC) + self.lifetime,
        )
        with Session(self._engine) as db:
            db.add(row)
            db.execute(delete(ConsoleSession).where(ConsoleSession.expires_at < datetime.now(UTC)))  # type: ignore[arg-type]
            db.commit()
        return session_id

    def get(self, session_id: str) -> ConsoleSession | None:
        with Session(self._engine) as db:
            row = db.get(ConsoleSession, _digest(session_id))
        if row is None:
            return None
        return row if as_utc(row.expires_at) > datetime.now(UTC) else None

    def end(self, session_id: str) -> None:
        with Session(self._engine) as db:
            db.execute(delete(ConsoleSession).where(ConsoleSession.id_hash == _digest(session_id)))  # type: ignore[arg-type]
            db.commit()

    async def authenticate(self, session_id: str, method: str, csrf_header: str | None) -> Principal:
        row = await asyncio.to_thread(self.get, session_id)
        if row is None:
            raise AuthenticationError()
        if method not in SAFE_METHODS and not hmac.compare_digest(row.csrf_token, csrf_header or ""):
            raise PermissionDeniedError("A state-changing request from the console needs its CSRF token.")
        return Principal(
            kind="session",
            subject=row.subject,
            roles=frozenset(row.roles),
            tenant_id=row.tenant_id,
            user_id=row.user_id,
            username=row.username,
        )

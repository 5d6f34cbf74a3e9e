"""Console sessions: an HttpOnly, Secure, SameSite=Strict cookie naming a server-side session, and a CSRF
token that every state-changing request made with that cookie must echo in ``X-CSRF-Token``.

A session of a local account follows its account at every request (in the same look-up as the session): a
disabled or deleted account ends it, changed roles or tenant apply at once. Sessions can be ended for one
subject or user everywhere (an administrator's "sign out everywhere")."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.identity.models import LOCAL_SUBJECT, ConsoleSession, LocalAccount
from appliance.lib.errors import AuthenticationError, PermissionDeniedError
from appliance.lib.principal import Principal
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
        """The live session, its roles and tenant those of its account now (a local account's)."""
        with Session(self._engine) as db:
            row = db.get(ConsoleSession, _digest(session_id))
            if row is None or as_utc(row.expires_at) <= datetime.now(UTC):
                return None
            if row.subject.startswith(LOCAL_SUBJECT):
                account = db.get(LocalAccount, row.subject.removeprefix(LOCAL_SUBJECT))
                if account is None or account.disabled:
                    db.delete(row)
                    db.commit()
                    return None
                roles = sorted(account.roles)
                if row.roles != roles or row.tenant_id != account.tenant_id:
                    row.roles, row.tenant_id = roles, account.tenant_id
                    db.add(row)
                    db.commit()
                    db.refresh(row)
            db.expunge(row)
        return row

    def end_all(self, *, subject: str | None = None, user_id: str | None = None) -> int:
        """End every session of ``subject`` (or of the mirrored user ``user_id``); returns how many."""
        if subject is None and user_id is None:
            raise ValueError("end_all needs a subject or a user id")
        condition = ConsoleSession.subject == subject if subject is not None else ConsoleSession.user_id == user_id
        with Session(self._engine) as db:
            result = db.execute(delete(ConsoleSession).where(condition))  # type: ignore[arg-type]
            db.commit()
        return int(getattr(result, "rowcount", 0) or 0)

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

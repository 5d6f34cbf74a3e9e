"""Mirroring identity-provider subjects into the users table the first time they are seen."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from appliance.identity.models import User
from appliance.lib.principal import Principal

REFRESH_EVERY_S = 60.0


class UserMirror:
    def __init__(self, engine: Engine, issuer: str) -> None:
        self._engine = engine
        self._issuer = issuer
        self._known: dict[str, tuple[str, float]] = {}  # subject -> (user id, when last written)

    async def mirror(self, principal: Principal, claims: dict[str, Any]) -> str:
        known = self._known.get(principal.subject)
        if known is not None and time.monotonic() - known[1] < REFRESH_EVERY_S:
            return known[0]
        user_id = await asyncio.to_thread(self._upsert, principal, claims)
        self._known[principal.subject] = (user_id, time.monotonic())
        return user_id

    def _upsert(self, principal: Principal, claims: dict[str, Any]) -> str:
        username = str(claims.get("preferred_username") or claims.get("client_id") or principal.subject)
        for _attempt in range(2):
            with Session(self._engine) as session:
                user = session.exec(
                    select(User).where(User.issuer == self._issuer, User.subject == principal.subject)
                ).first()
                if user is None:
                    user = User(issuer=self._issuer, subject=principal.subject)
                user.username = username[:300]
                user.tenant_id = principal.tenant_id
                user.roles = sorted(principal.roles)
                user.last_seen_at = datetime.now(UTC)
                session.add(user)
                try:
                    session.commit()
                except IntegrityError:  # another request mirrored the same subject at the same moment
                    session.rollback()
                    continue
                return user.id
        raise RuntimeError("could not mirror user")

"""Administration of the embedded issuer's local accounts: disable and enable, reset the password (a new
one-time password, to be changed at the next sign-in), change the roles, sign out everywhere.

Admins only; a tenant's admin reaches its tenant's accounts only (others answer 404). The last enabled
platform administrator can be neither disabled nor demoted (409): no one could administer the appliance."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from appliance.identity.accounts import hash_password
from appliance.identity.models import LOCAL_SUBJECT, LocalAccount
from appliance.identity.schemas import LocalAccountUpdate
from appliance.identity.sessions import SessionStore
from appliance.lib.errors import ConflictError, NotFoundError
from appliance.lib.principal import ADMIN, Principal

PUBLIC_FIELDS = ("username", "roles", "tenant_id", "must_change_password", "disabled", "created_at")


def public(account: LocalAccount) -> dict[str, Any]:
    return {name: getattr(account, name) for name in PUBLIC_FIELDS}


def _owned(session: Session, principal: Principal, username: str) -> LocalAccount:
    principal.require_role(ADMIN)
    account = session.get(LocalAccount, username)
    if account is None:
        raise NotFoundError("No such account.")
    principal.check_tenant(account.tenant_id)
    return account


def _is_platform_admin(account: LocalAccount) -> bool:
    return account.tenant_id is None and ADMIN in account.roles and not account.disabled


def page(engine: Engine, principal: Principal, limit: int, offset: int) -> dict[str, Any]:
    principal.require_role(ADMIN)
    conditions = [] if principal.tenant_id is None else [col(LocalAccount.tenant_id) == principal.tenant_id]
    with Session(engine) as session:
        total = session.exec(select(func.count()).select_from(LocalAccount).where(*conditions)).one()
        rows = session.exec(
            select(LocalAccount).where(*conditions).order_by(col(LocalAccount.username)).offset(offset).limit(limit)
        ).all()
        return {"object": "list", "data": [public(r) for r in rows], "total": total, "limit": limit, "offset": offset}


def read(engine: Engine, principal: Principal, username: str) -> dict[str, Any]:
    with Session(engine) as session:
        return public(_owned(session, principal, username))


def update(
    engine: Engine, sessions: SessionStore, principal: Principal, username: str, data: LocalAccountUpdate
) -> dict[str, Any]:
    """New roles, or disabled / enabled. Sessions follow at their next request; a disabled account's end."""
    with Session(engine) as session:
        account = _owned(session, principal, username)
        was_platform_admin = _is_platform_admin(account)
        if data.roles is not None:
            account.roles = sorted(set(data.roles))
        if data.disabled is not None:
            account.disabled = data.disabled
        session.add(account)
        session.flush()
        if was_platform_admin and not _is_platform_admin(account) and _platform_admins(session) == 0:
            raise ConflictError("This is the last enabled platform administrator: it stays one.")
        session.commit()
        session.refresh(account)
        result = public(account)
    if data.disabled:
        sessions.end_all(subject=f"{LOCAL_SUBJECT}{username}")
    return result


def _platform_admins(session: Session) -> int:
    """Enabled platform administrators, this transaction's changes included."""
    accounts = session.exec(
        select(LocalAccount).where(col(LocalAccount.tenant_id).is_(None), col(LocalAccount.disabled).is_(False))
    ).all()
    return sum(1 for account in accounts if ADMIN in account.roles)


def reset_password(engine: Engine, sessions: SessionStore, principal: Principal, username: str) -> dict[str, Any]:
    """(In the password-hashing pool.) A new one-time password, shown this once; the account must choose a new
    password at its next sign-in, and its sessions end."""
    password = secrets.token_urlsafe(18)
    with Session(engine) as session:
        account = _owned(session, principal, username)
        account.password_hash = hash_password(password)
        account.must_change_password = True
        session.add(account)
        session.commit()
    sessions.end_all(subject=f"{LOCAL_SUBJECT}{username}")
    return {"username": username, "one_time_password": password, "must_change_password": True}


def sign_out(engine: Engine, sessions: SessionStore, principal: Principal, username: str) -> dict[str, Any]:
    with Session(engine) as session:
        _owned(session, principal, username)
    return {"username": username, "signed_out": sessions.end_all(subject=f"{LOCAL_SUBJECT}{username}")}

"""Admin API of the embedded issuer's local accounts: /admin/local-accounts (the people who sign in to the
console; /admin/users lists the identity provider's subjects as the appliance has seen them).

Thin routes over :mod:`appliance.identity.local_accounts` (admins only, which its functions check again with
the tenant rule); every change is audited by the audit middleware (``admin.local-accounts.update``,
``.reset_password``, ``.sign_out``)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from litestar import Controller, Request, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.engine import Engine

from appliance.audit.middleware import add_audit_detail, audit_action
from appliance.identity import local_accounts
from appliance.identity.accounts import PasswordWork
from appliance.identity.auth import Authenticator
from appliance.identity.schemas import LocalAccountUpdate
from appliance.lib.guards import CurrentPrincipal, checked_in_body, requires
from appliance.lib.principal import ADMIN

Limit = Annotated[int, QueryParameter(ge=1, le=200)]
Offset = Annotated[int, QueryParameter(ge=0, le=2**31 - 1)]  # an offset past a 64-bit integer was a 500
Db = NamedDependency[Engine]
ADMINS = [requires(ADMIN)]


class LocalAccountController(Controller):
    path = "/admin/local-accounts"

    @get("/", guards=ADMINS)
    async def list_accounts(
        self, principal: CurrentPrincipal, db_engine: Db, limit: Limit = 50, offset: Offset = 0
    ) -> dict[str, Any]:
        return await asyncio.to_thread(local_accounts.page, db_engine, principal, limit, offset)

    @get("/{username:str}", guards=ADMINS)
    async def get_account(self, principal: CurrentPrincipal, db_engine: Db, username: FromPath[str]) -> dict[str, Any]:
        return await asyncio.to_thread(local_accounts.read, db_engine, principal, username)

    @patch(
        "/{username:str}",
        opt=checked_in_body(
            "the audit record of a refused change names the roles it asked for, which are in the body: "
            "local_accounts.update checks the role after the body is read"
        ),
    )
    async def update_account(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        db_engine: Db,
        authenticator: NamedDependency[Authenticator],
        username: FromPath[str],
        data: JSONBody[LocalAccountUpdate],
    ) -> dict[str, Any]:
        add_audit_detail(request.scope, roles=data.roles, disabled=data.disabled)
        sessions = authenticator.sessions
        return await asyncio.to_thread(local_accounts.update, db_engine, sessions, principal, username, data)

    @post("/{username:str}/reset-password", status_code=200, guards=ADMINS, opt=audit_action("reset_password"))
    async def reset_password(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        authenticator: NamedDependency[Authenticator],
        password_work: NamedDependency[PasswordWork],
        username: FromPath[str],
    ) -> dict[str, Any]:
        return await password_work.run(
            local_accounts.reset_password, db_engine, authenticator.sessions, principal, username
        )

    @post("/{username:str}/sign-out", status_code=200, guards=ADMINS, opt=audit_action("sign_out"))
    async def sign_out(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        authenticator: NamedDependency[Authenticator],
        username: FromPath[str],
    ) -> dict[str, Any]:
        return await asyncio.to_thread(local_accounts.sign_out, db_engine, authenticator.sessions, principal, username)

"""Who may call a route, declared with the route: the authenticated principal as a dependency, and role guards.

The authentication middleware (:mod:`appliance.identity.auth`) leaves the principal in the scope. A handler
takes it as a parameter, ``principal: CurrentPrincipal`` (the app provides it under that name), and its role
rule is a guard on the handler, its controller or its router: ``guards=[requires(ADMIN)]``. A guard runs before
the handler, before its body is read, and refuses with the principal's own checks, so with the same error
(status, envelope, audit record) a check in the handler gave.

What depends on the data (another tenant's resource answers 404; a tenant's admin may not change a platform
budget) stays in the service functions, which the CLI calls too and which keep their own role checks. A route
whose role rule cannot run before its body is read says so with ``opt=checked_in_body(reason)``; the route walk
in tests/unit/lib/test_route_guards.py refuses any other protected route without a guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.handlers.base import BaseRouteHandler

from appliance.lib.errors import AuthenticationError
from appliance.lib.principal import Principal, principal_of

CurrentPrincipal = NamedDependency[Principal]  # a handler's `principal` parameter
BODY_CHECK_KEY = "role_rule_in_body"  # a route handler's `opt` key: why its role rule is in its body


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """The authenticated principal of this request (401 if there is none: a protected path always has one)."""
    return principal_of(request.scope)


PRINCIPAL = Provide(provide_principal, sync_to_thread=False)  # registered once, on the app, as `principal`


@dataclass(frozen=True, slots=True)
class RoleGuard:
    """A route's rule on who may call it: a Litestar guard over the authenticated principal."""

    rule: str  # the rule in words (for readers and the route walk)
    check: Callable[[Principal], None]  # raises PermissionDeniedError (403) or AuthenticationError (401)

    async def __call__(self, connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
        self.check(principal_of(connection.scope))


def requires(*roles: str) -> RoleGuard:
    """One of ``roles``, with or without a tenant (a tenant-bound principal then sees its tenant only)."""
    return RoleGuard(" or ".join(roles), lambda principal: principal.require_role(*roles))


def requires_platform(*roles: str, why: str) -> RoleGuard:
    """One of ``roles`` and no tenant: for what covers every tenant; ``why`` is the tenant-bound refusal."""
    return RoleGuard(
        f"{' or '.join(roles)}, without a tenant", lambda principal: principal.require_platform(*roles, why=why)
    )


def _console_session(principal: Principal) -> None:
    if principal.kind != "session":
        raise AuthenticationError()


def _anyone(_principal: Principal) -> None:
    """Authentication is the whole rule (the middleware has checked the credential, and a session's CSRF)."""


INFERENCE = RoleGuard("an inference role, and a tenant unless platform-wide", Principal.require_inference)
READS_TENANT_DATA = RoleGuard("retrieval data: an inference role", lambda p: p.require_tenant_data())
CHANGES_TENANT_DATA = RoleGuard(
    "changes retrieval data: a tenant's, or a platform admin", lambda p: p.require_tenant_data(write=True)
)
READS_TENANT_CONTENT = RoleGuard(
    "reads retrieval content: a tenant's, or a platform admin", lambda p: p.require_tenant_data(content=True)
)
SIGNED_IN = RoleGuard("any authenticated caller", _anyone)
CONSOLE_SESSION = RoleGuard("a console session", _console_session)


def checked_in_body(reason: str) -> dict[str, str]:
    """``opt`` of a route whose role rule runs in its handler or service, with the reason it cannot be a guard."""
    return {BODY_CHECK_KEY: reason}

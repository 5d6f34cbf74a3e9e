"""Who is calling: the identity every route works with, whatever the credential was.

Only platform administrators and operators are tenant-less: every other principal works on one tenant's
data. A credential with the `user` role but no tenant (a token without a `tenant` claim, say) is refused on
the inference and retrieval API (403), unless a default tenant is configured, to which it is then bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from appliance.lib.errors import AuthenticationError, NotFoundError, PermissionDeniedError

ADMIN, OPERATOR, AUDITOR, USER = "admin", "operator", "auditor", "user"
PLATFORM_ROLES = (ADMIN, OPERATOR)  # the only roles that may act without a tenant
INFERENCE_ROLES = (USER, ADMIN, OPERATOR)  # auditors read the audit trail; they do not run models
NO_TENANT = (
    "This credential is bound to no tenant: only platform administrators and operators act without one. "
    "Use a credential of your tenant (an API key, or a token with a `tenant` claim)."
)


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["token", "api_key", "session"]
    subject: str  # the token's `sub`, or the API key's id
    roles: frozenset[str] = field(default_factory=frozenset)
    tenant_id: str | None = None  # None: a platform-wide principal (only tokens can be one)
    workflow_id: str | None = None
    agent_id: str | None = None
    api_key_id: str | None = None
    user_id: str | None = None
    client_id: str | None = None
    username: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    models: frozenset[str] | None = None  # an API key's model allowlist (None: its tenant's)

    def has_role(self, *roles: str) -> bool:
        return bool(self.roles.intersection(roles))

    def require_role(self, *roles: str) -> None:
        if not self.has_role(*roles):
            raise PermissionDeniedError()

    def require_platform(self, *roles: str, why: str) -> None:
        """One of ``roles`` and no tenant: what covers every tenant (the audit tree, metrics, the placement
        report). ``why`` is the refusal's message for a tenant-bound principal with the role."""
        self.require_role(*roles)
        if self.tenant_id is not None:
            raise PermissionDeniedError(why)

    @property
    def is_platform(self) -> bool:
        """A platform administrator or operator: tenant-less, it may act on every tenant."""
        return self.tenant_id is None and self.has_role(*PLATFORM_ROLES)

    @property
    def is_platform_admin(self) -> bool:
        return self.tenant_id is None and self.has_role(ADMIN)

    def require_inference(self) -> None:
        """The /v1 and /v1/rag API: an inference role, and a tenant unless the principal is a platform one
        (a tenant-less `user` would otherwise run unbudgeted and see every tenant's data)."""
        self.require_role(*INFERENCE_ROLES)
        if self.tenant_id is None and not self.is_platform:
            raise PermissionDeniedError(NO_TENANT)

    def require_tenant_data(self, *, write: bool = False, content: bool = False) -> None:
        """Retrieval data (collections, documents, what a query returns). A tenant-bound principal reaches its
        own tenant's; a tenant-less one is a platform principal reaching every tenant's, so a platform
        operator (who reads, never changes) may list collections and documents but neither change them nor
        read their content: that takes a platform administrator."""
        self.require_inference()
        if self.tenant_id is None and (write or content) and not self.has_role(ADMIN):
            raise PermissionDeniedError(
                "Without a tenant only a platform administrator changes retrieval data or reads its content."
            )

    def check_tenant(self, tenant_id: str | None) -> None:
        """Refuse a resource of another tenant as if it did not exist (404, never its data)."""
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            raise NotFoundError("No such resource.")

    def tenant_scope(self, requested: str | None) -> str | None:
        """The tenant a listing is limited to: the principal's own, whatever the request asked for."""
        if self.tenant_id is not None:
            return self.tenant_id
        return requested


def wants_default_tenant(principal: Principal) -> bool:
    """A tenant-less `user`, which a configured default tenant binds (platform administrators, operators and
    auditors stay tenant-less)."""
    return principal.tenant_id is None and principal.has_role(USER) and not principal.has_role(ADMIN, OPERATOR, AUDITOR)


def bind_default_tenant(principal: Principal, tenant_id: str | None) -> Principal:
    """The principal bound to ``tenant_id`` if it wants a default tenant and one is given; else unchanged."""
    if tenant_id is None or not wants_default_tenant(principal):
        return principal
    return replace(principal, tenant_id=tenant_id)


STATE_KEY = "appliance_principal"  # where authentication leaves the principal in the ASGI scope


def principal_of(scope: Any) -> Principal:
    """The principal authentication set in the ASGI ``scope``."""
    principal = scope.get("state", {}).get(STATE_KEY)
    if not isinstance(principal, Principal):
        raise AuthenticationError()  # a protected handler without an authenticated principal: refuse
    return principal

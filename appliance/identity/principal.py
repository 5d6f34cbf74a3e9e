"""Who is calling: the identity every route works with, whatever the credential was."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from appliance.lib.errors import NotFoundError, PermissionDeniedError

ADMIN, OPERATOR, AUDITOR, USER = "admin", "operator", "auditor", "user"


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

    def has_role(self, *roles: str) -> bool:
        return bool(self.roles.intersection(roles))

    def require_role(self, *roles: str) -> None:
        if not self.has_role(*roles):
            raise PermissionDeniedError()

    def check_tenant(self, tenant_id: str | None) -> None:
        """Refuse a resource of another tenant as if it did not exist (404, never its data)."""
        if self.tenant_id is not None and tenant_id != self.tenant_id:
            raise NotFoundError("No such resource.")

    def tenant_scope(self, requested: str | None) -> str | None:
        """The tenant a listing is limited to: the principal's own, whatever the request asked for."""
        if self.tenant_id is not None:
            return self.tenant_id
        return requested

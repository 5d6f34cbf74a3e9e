"""What other domains do when a tenant, workflow or agent is removed: identity sits below them, so they hand it
their checks and clean-ups when the application is wired (budgets refuse a removal that would drop a platform
budget; retrieval deletes a removed tenant's collections), and identity never imports them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session

from appliance.lib.principal import Principal

RemovalCheck = Callable[[Session, Principal, str, str], None]  # (session, who, scope type, scope id): raises to refuse
TenantCleanup = Callable[[str], Awaitable[Any]]  # a removed tenant's id


@dataclass(frozen=True)
class RemovalHooks:
    checks: Sequence[RemovalCheck] = ()
    tenant_cleanups: Sequence[TenantCleanup] = field(default_factory=tuple)

    def check(self, session: Session, principal: Principal, scope_type: str, scope_id: str) -> None:
        for check in self.checks:
            check(session, principal, scope_type, scope_id)

    async def forget_tenant(self, tenant_id: str) -> None:
        for cleanup in self.tenant_cleanups:
            await cleanup(tenant_id)

"""The default tenant of tenant-less users (``identity.default_tenant``): where it is configured, a `user`
credential without a tenant is bound to it instead of being refused.

Fails closed: the start refuses a default tenant that does not exist, and one deleted while the appliance
runs binds nobody from then on (within a second), so its users are refused rather than served unbudgeted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import or_
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from appliance.identity.models import Tenant
from appliance.lib.errors import PermissionDeniedError
from appliance.lib.principal import Principal, bind_default_tenant, wants_default_tenant
from appliance.lib.recheck import Recheck

RECHECK_EVERY_S = 1.0


class DefaultTenantMissingError(RuntimeError):
    """The configured default tenant names no tenant: the appliance does not start."""


def find_tenant(engine: Engine, id_or_name: str) -> str | None:
    """The id of the tenant with this id or name."""
    with Session(engine) as session:
        found = session.exec(
            select(Tenant.id).where(or_(col(Tenant.id) == id_or_name, col(Tenant.name) == id_or_name))
        ).first()
        return str(found) if found is not None else None


def check_default_tenant(engine: Engine, id_or_name: str | None) -> str | None:
    """At start: the default tenant's id (None when none is configured); raises when it names no tenant."""
    if id_or_name is None:
        return None
    tenant_id = find_tenant(engine, id_or_name)
    if tenant_id is None:
        raise DefaultTenantMissingError(
            f"identity.default_tenant is {id_or_name!r}, which names no tenant: create the tenant "
            "(appliance admin create-key --tenant NAME --workflow W --create) or unset the setting."
        )
    return tenant_id


class DefaultTenant:
    def __init__(self, engine: Engine, id_or_name: str | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._id_or_name = id_or_name
        self._clock = clock
        self._found: str | None = None
        self._checked_at = -float("inf")

    async def bind(self, principal: Principal) -> Principal:
        if self._id_or_name is None or not wants_default_tenant(principal):
            return principal
        if self._clock() - self._checked_at >= RECHECK_EVERY_S:
            self._found = await asyncio.to_thread(find_tenant, self._engine, self._id_or_name)
            self._checked_at = self._clock()
        return bind_default_tenant(principal, self._found)


UNKNOWN_TENANT = "The tenant this credential is bound to does not exist (any more) on this appliance."


class TenantCheck:
    """Every tenant-bound principal's tenant exists: a token whose `tenant` claim names no tenant (a typo in
    the identity provider, a deleted tenant) is refused with 403, never served without budgets. A tenant seen
    to exist is trusted for ``recheck_s`` (:class:`Recheck`: one lookup at a time, refreshed in the background
    under load), so a deleted one is refused within that time; a missing one is looked up on every request (a
    signed token is needed to make one)."""

    def __init__(
        self,
        engine: Engine,
        *,
        recheck_s: float = RECHECK_EVERY_S,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._seen: Recheck[str, bool] = Recheck(self._look_up, ttl_s=recheck_s, max_entries=max_entries, clock=clock)

    async def check(self, principal: Principal) -> None:
        if principal.tenant_id is not None:
            await self._seen.get(principal.tenant_id)

    async def _look_up(self, tenant_id: str) -> bool:
        """True, or refused (an answer that raises is not kept: a missing tenant is looked up again)."""
        if not await asyncio.to_thread(self._exists, tenant_id):
            raise PermissionDeniedError(UNKNOWN_TENANT)
        return True

    def _exists(self, tenant_id: str) -> bool:
        with Session(self._engine) as session:
            return session.get(Tenant, tenant_id) is not None


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    """What the request path needs to know of a tenant's settings."""

    content_capture: bool = False  # its prompts and answers are kept
    models: frozenset[str] | None = None  # the models its callers may use (None: all)


class TenantPolicies:
    """Each tenant's :class:`TenantPolicy`, from memory: looked up again every second, so a change made by
    another process applies within a second (one made here, at once)."""

    def __init__(self, engine: Engine, *, recheck_s: float = RECHECK_EVERY_S) -> None:
        self._engine = engine
        self._known: Recheck[str, TenantPolicy] = Recheck(self._look_up, ttl_s=recheck_s)

    async def of(self, tenant_id: str | None) -> TenantPolicy:
        return NO_POLICY if tenant_id is None else await self._known.get(tenant_id)

    def changed(self, tenant_id: str) -> None:
        self._known.forget(tenant_id)

    async def _look_up(self, tenant_id: str) -> TenantPolicy:
        return await asyncio.to_thread(self._policy, tenant_id)

    def _policy(self, tenant_id: str) -> TenantPolicy:
        with Session(self._engine) as session:
            tenant = session.get(Tenant, tenant_id)
            if tenant is None:
                return NO_POLICY
            models = frozenset(tenant.allowed_models) if tenant.allowed_models is not None else None
            return TenantPolicy(content_capture=tenant.content_capture, models=models)


NO_POLICY = TenantPolicy()

"""Who sets which budget.

Platform administrators (an `admin` without a tenant) set any budget; theirs are owned by the platform. A
tenant's administrators (an `admin` bound to a tenant, admin-scoped API keys included) set budgets on their
tenant's workflows, agents and API keys only, never above a ceiling (a budget of the same kind and period on a
scope above, along api_key -> agent -> workflow -> tenant), and never change or delete a budget the platform
owns, nor delete a workflow or agent that carries one (which would drop it).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_
from sqlmodel import Session, SQLModel, col, select

from appliance.budgets.models import Budget
from appliance.identity.models import Agent, ApiKey, Tenant, Workflow
from appliance.ledger.pricing import to_currency
from appliance.lib.errors import PermissionDeniedError
from appliance.lib.principal import ADMIN, Principal

PLATFORM, TENANT = "platform", "tenant"
SCOPE_MODELS: dict[str, type[SQLModel]] = {"tenant": Tenant, "workflow": Workflow, "agent": Agent, "api_key": ApiKey}


def owner_of(principal: Principal) -> str:
    """Whose a budget this principal sets is: the platform's or its tenant's."""
    principal.require_role(ADMIN)
    return PLATFORM if principal.tenant_id is None else TENANT


def scopes_above(scope: SQLModel) -> list[tuple[str, str]]:
    """The scopes whose budgets bound this one's, nearest first."""
    if isinstance(scope, ApiKey):
        above = [("agent", scope.agent_id)] if scope.agent_id else []
        return [*above, ("workflow", scope.workflow_id), ("tenant", scope.tenant_id)]
    if isinstance(scope, Agent):
        return [("workflow", scope.workflow_id), ("tenant", scope.tenant_id)]
    if isinstance(scope, Workflow):
        return [("tenant", scope.tenant_id)]
    return []


def shown_limit(kind: str, limit: int) -> float | int:
    return to_currency(limit) if kind == "cost" else limit


def check_create(session: Session, principal: Principal, scope: SQLModel, kind: str, period: str, limit: int) -> None:
    """May this principal set a budget of ``limit`` on ``scope``? Raises 403 with the reason when not."""
    if owner_of(principal) == PLATFORM:
        return
    if isinstance(scope, Tenant):
        raise PermissionDeniedError(
            "A tenant's own budgets are set by a platform administrator; a tenant's administrators set budgets "
            "on its workflows, agents and API keys."
        )
    check_ceilings(session, scope, kind, period, limit)


def check_change(session: Session, principal: Principal, budget: Budget, limit: int | None) -> None:
    """May this principal change ``budget`` to ``limit`` (None: delete it)? Raises 403 when not."""
    if owner_of(principal) == PLATFORM:
        return
    if budget.owner == PLATFORM:
        verb = "delete" if limit is None else "change"
        raise PermissionDeniedError(
            f"Budget {budget.id} was set by a platform administrator: a tenant's administrators cannot {verb} it."
        )
    if limit is not None:
        scope = session.get(SCOPE_MODELS[budget.scope_type], budget.scope_id)
        if scope is not None:
            check_ceilings(session, scope, budget.kind, budget.period, limit)


def check_ceilings(session: Session, scope: SQLModel, kind: str, period: str, limit: int) -> None:
    """A tenant administrator's budget stays within every budget of its kind and period above its scope."""
    above = scopes_above(scope)
    if not above:
        return
    ceilings = session.exec(
        select(Budget).where(
            or_(*(and_(col(Budget.scope_type) == kind_, col(Budget.scope_id) == ident) for kind_, ident in above)),
            col(Budget.kind) == kind,
            col(Budget.period) == period,
        )
    ).all()
    for ceiling in sorted(ceilings, key=lambda budget: budget.limit):
        if limit > ceiling.limit:
            raise PermissionDeniedError(
                f"A limit of {shown_limit(kind, limit)} is above budget {ceiling.id} of {ceiling.scope_type} "
                f"{ceiling.scope_id} ({shown_limit(kind, ceiling.limit)} {kind} per {period}): a tenant's "
                "administrators set budgets within the ceilings above them."
            )


def check_scope_removal(session: Session, principal: Principal, scope_type: str, scope_id: str) -> None:
    """A tenant's administrators cannot delete their tenant, a workflow or an agent that carries a platform
    budget (on itself or on a scope under it): that would drop the budget."""
    if principal.tenant_id is None:
        return
    if scope_type == "tenant":
        platform = session.exec(
            select(Budget.id).where(col(Budget.tenant_id) == scope_id, col(Budget.owner) == PLATFORM)
        ).first()
        if platform is not None:
            raise PermissionDeniedError(
                f"This tenant carries budget {platform}, set by a platform administrator: only a platform "
                "administrator deletes it."
            )
        return
    scopes = [(scope_type, scope_id)]
    if scope_type == "workflow":
        scopes += [("agent", a) for a in session.exec(select(Agent.id).where(col(Agent.workflow_id) == scope_id))]
        scopes += [("api_key", k) for k in session.exec(select(ApiKey.id).where(col(ApiKey.workflow_id) == scope_id))]
    elif scope_type == "agent":
        scopes += [("api_key", k) for k in session.exec(select(ApiKey.id).where(col(ApiKey.agent_id) == scope_id))]
    held: Any = session.exec(
        select(Budget.id).where(
            or_(*(and_(col(Budget.scope_type) == kind, col(Budget.scope_id) == ident) for kind, ident in scopes)),
            col(Budget.owner) == PLATFORM,
        )
    ).first()
    if held is not None:
        raise PermissionDeniedError(
            f"This {scope_type} carries budget {held}, set by a platform administrator: a tenant's administrators "
            "cannot delete it."
        )

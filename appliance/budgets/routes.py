"""Admin API of budgets: create, list with what is used and when it resets, change the limit, delete.

Money (`cost`) budgets take and show their limit in the configured currency; they are kept in millionths.
Who may set which budget is :mod:`appliance.budgets.access`; every change's audit record holds the budget
with its old and new limit.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from msgspec import Meta, Struct
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel

from appliance.audit.middleware import add_audit_detail
from appliance.budgets import access
from appliance.budgets.leases import BudgetLeases
from appliance.budgets.models import Budget
from appliance.budgets.store import BudgetStore
from appliance.identity import service as identity
from appliance.identity.models import Tenant
from appliance.ledger.pricing import to_currency, to_micros
from appliance.lib.errors import ConflictError, InvalidRequestError
from appliance.lib.guards import CurrentPrincipal, requires
from appliance.lib.principal import ADMIN, OPERATOR
from appliance.settings import Settings


class BudgetCreate(Struct, forbid_unknown_fields=True):
    scope_type: Literal["tenant", "workflow", "agent", "api_key"]
    scope_id: Annotated[str, Meta(min_length=1, max_length=32)]
    kind: Literal["tokens", "requests", "cost", "max_tokens", "max_retries", "max_depth"]
    limit: Annotated[float, Meta(ge=0, le=10**12)]
    period: Literal["minute", "hour", "day", "month", "none"] = "day"


class BudgetUpdate(Struct, forbid_unknown_fields=True):
    limit: Annotated[float, Meta(ge=0, le=10**12)]


def _stored_limit(kind: str, limit: float) -> int:
    """The limit as kept: millionths of the currency for money, a whole number for everything else."""
    if kind == "cost":
        return to_micros(limit)
    if limit != int(limit):
        raise InvalidRequestError(f"A `{kind}` limit is a whole number.", param="limit")
    if limit == 0 and kind in ("tokens", "requests", "cost", "max_tokens"):
        raise InvalidRequestError("A limit of 0 would refuse every request.", param="limit")
    return int(limit)


def _shown(budget: Budget) -> dict[str, Any]:
    out = budget.model_dump()
    if budget.kind == "cost":
        out["limit"] = to_currency(budget.limit)
    return out


def _audit(request: Request[Any, Any, Any], budget: Budget, old: int | None, new: int | None) -> None:
    """The budget and its limit before and after the change (None: it did not exist, or no longer does). A new
    budget's id is the record's object, once it is made."""
    add_audit_detail(
        request.scope,
        budget={
            "id": None if old is None else budget.id,
            "scope_type": budget.scope_type,
            "scope_id": budget.scope_id,
            "kind": budget.kind,
            "period": budget.period,
            "owner": budget.owner,
            "old_limit": None if old is None else access.shown_limit(budget.kind, old),
            "new_limit": None if new is None else access.shown_limit(budget.kind, new),
        },
    )


ADMINS = [requires(ADMIN)]  # set budgets (which ones: access.check_create and check_change)


class BudgetController(Controller):
    path = "/admin/budgets"

    @get("/", guards=[requires(ADMIN, OPERATOR)])
    async def list_budgets(
        self,
        principal: CurrentPrincipal,
        budget_store: NamedDependency[BudgetStore],
        budget_leases: NamedDependency[BudgetLeases],
        settings: NamedDependency[Settings],
    ) -> dict[str, Any]:
        """Every budget with what it used: this process's spending committed first (another gateway process's is
        at most ``budgets.commit_interval_s`` behind), and what its requests in flight hold shown as reserved."""
        await budget_leases.committed()
        data = await asyncio.to_thread(budget_store.status, principal.tenant_id, budget_leases.in_flight())
        return {"object": "list", "data": data, "total": len(data), "currency": settings.pricing.currency}

    @post("/", sync_to_thread=True, guards=ADMINS)
    def create_budget(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        db_engine: NamedDependency[Engine],
        budget_leases: NamedDependency[BudgetLeases],
        data: JSONBody[BudgetCreate],
    ) -> dict[str, Any]:
        owner = access.owner_of(principal)
        per_call = data.kind in ("max_tokens", "max_retries", "max_depth")
        if per_call != (data.period == "none"):
            raise InvalidRequestError(
                "`max_tokens`, `max_retries` and `max_depth` budgets have period `none`; the others do not.",
                param="period",
            )
        limit = _stored_limit(data.kind, data.limit)
        with Session(db_engine) as session:
            scope: SQLModel = identity.get_owned(
                session, principal, access.SCOPE_MODELS[data.scope_type], data.scope_id
            )
            tenant_id = scope.id if isinstance(scope, Tenant) else str(getattr(scope, "tenant_id"))  # noqa: B009
            budget = Budget(
                tenant_id=tenant_id,
                scope_type=data.scope_type,
                scope_id=data.scope_id,
                kind=data.kind,
                period=data.period,
                limit=limit,
                created_by=principal.subject,
                owner=owner,
            )
            _audit(request, budget, None, limit)
            access.check_create(session, principal, scope, data.kind, data.period, limit)
            session.add(budget)
            try:
                session.commit()
            except IntegrityError:
                raise ConflictError("That scope already has a budget of this kind and period.") from None
            budget_leases.rules_changed()  # at once here; other processes see it within a second
            session.refresh(budget)
            return _shown(budget)

    @patch("/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def update_budget(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        db_engine: NamedDependency[Engine],
        budget_leases: NamedDependency[BudgetLeases],
        item_id: FromPath[str],
        data: JSONBody[BudgetUpdate],
    ) -> dict[str, Any]:
        """Change a budget's limit; what it used this period stays (a lower limit can leave nothing)."""
        with Session(db_engine) as session:
            budget = identity.get_owned(session, principal, Budget, item_id)
            old, limit = budget.limit, _stored_limit(budget.kind, data.limit)
            _audit(request, budget, old, limit)
            access.check_change(session, principal, budget, limit)
            budget.limit = limit
            session.add(budget)
            session.commit()
            budget_leases.rules_changed()
            session.refresh(budget)
            return _shown(budget)

    @delete("/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def delete_budget(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        db_engine: NamedDependency[Engine],
        budget_leases: NamedDependency[BudgetLeases],
        item_id: FromPath[str],
    ) -> None:
        with Session(db_engine) as session:
            budget = identity.get_owned(session, principal, Budget, item_id)
            _audit(request, budget, budget.limit, None)
            access.check_change(session, principal, budget, None)
            session.delete(budget)
            session.commit()
            budget_leases.rules_changed()

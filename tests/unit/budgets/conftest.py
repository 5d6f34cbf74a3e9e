"""Fixtures of the budget store's tests: one store on SQLite and on a real PostgreSQL server, with a clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlmodel import Session

from appliance.budgets.models import Budget
from appliance.budgets.store import BudgetStore
from appliance.db.engine import create_schema, make_engine
from appliance.identity.models import Tenant, Workflow

CHAIN = {"api_key": "key_1", "workflow": "wf_1", "tenant": "ten_1"}


class Clock:
    def __init__(self, moment: datetime) -> None:
        self.moment = moment

    def __call__(self) -> datetime:
        return self.moment


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 22, 10, 30, tzinfo=UTC))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> BudgetStore:
    """The same store on SQLite (one gateway process) and on a real PostgreSQL server (several)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'budgets.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"budgets_{uuid.uuid4().hex[:12]}")
    create_schema(make_engine(url))
    with Session(make_engine(url)) as session:
        session.add(Tenant(id="ten_1", name="acme"))
        session.add(Workflow(id="wf_1", tenant_id="ten_1", name="w"))
        session.commit()
    return BudgetStore(make_engine(url, serialized_writes=True), ZoneInfo("Europe/Paris"), clock)


def add_budget(store: BudgetStore, scope: str, ident: str, kind: str, period: str, limit: int) -> str:
    budget = Budget(
        tenant_id="ten_1", scope_type=scope, scope_id=ident, kind=kind, period=period, limit=limit, created_by="test"
    )
    with Session(store._engine) as session:
        session.add(budget)
        session.commit()
        return budget.id

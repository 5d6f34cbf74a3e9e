"""``GET /admin/drift/?window=hour|day&baseline_days=7``: behavioural drift findings per workflow, agent and
model (admins and operators; a principal bound to a tenant sees only its tenant's groups)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from sqlalchemy.engine import Engine

from appliance.drift.report import drift_report
from appliance.lib.guards import CurrentPrincipal, requires
from appliance.lib.principal import ADMIN, OPERATOR


class DriftController(Controller):
    path = "/admin/drift"
    guards = [requires(ADMIN, OPERATOR)]

    @get("/")
    async def findings(
        self,
        principal: CurrentPrincipal,
        db_engine: NamedDependency[Engine],
        window: Annotated[Literal["hour", "day"], QueryParameter()] = "day",
        baseline_days: Annotated[int, QueryParameter(ge=1, le=60)] = 7,
        min_samples: Annotated[int, QueryParameter(ge=5, le=100_000)] = 30,
    ) -> dict[str, Any]:
        return await asyncio.to_thread(
            drift_report,
            db_engine,
            window=window,
            baseline_days=baseline_days,
            min_samples=min_samples,
            tenant_id=principal.tenant_id,
        )

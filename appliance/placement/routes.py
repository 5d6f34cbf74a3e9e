"""``GET /admin/placement``: the placement report (platform admins and operators: it is about the whole node)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from sqlalchemy.engine import Engine

from appliance.lib.errors import PermissionDeniedError
from appliance.lib.principal import ADMIN, OPERATOR, principal_of
from appliance.placement.service import build_report
from appliance.settings import Settings


class PlacementController(Controller):
    path = "/admin/placement"

    @get("/")
    async def report(
        self,
        request: Request[Any, Any, Any],
        db_engine: NamedDependency[Engine],
        settings: NamedDependency[Settings],
    ) -> dict[str, Any]:
        principal = principal_of(request.scope)
        principal.require_role(ADMIN, OPERATOR)
        if principal.tenant_id is not None:
            raise PermissionDeniedError("The placement report covers the whole node: platform admins and operators.")
        return await asyncio.to_thread(build_report, db_engine, settings)

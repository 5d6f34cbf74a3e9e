"""``GET /admin/placement``: the placement report (platform admins and operators: it is about the whole node)."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Controller, get
from litestar.di import NamedDependency
from sqlalchemy.engine import Engine

from appliance.lib.guards import requires_platform
from appliance.lib.principal import ADMIN, OPERATOR
from appliance.placement.service import build_report
from appliance.settings import Settings


class PlacementController(Controller):
    path = "/admin/placement"
    guards = [
        requires_platform(
            ADMIN, OPERATOR, why="The placement report covers the whole node: platform admins and operators."
        )
    ]

    @get("/")
    async def report(self, db_engine: NamedDependency[Engine], settings: NamedDependency[Settings]) -> dict[str, Any]:
        return await asyncio.to_thread(build_report, db_engine, settings)

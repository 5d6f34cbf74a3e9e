"""The gateway's view of the registry: every ``registry.poll_interval_s`` it reads which engines serve each
deployed served name and points its router at them (a deployment's switch reaches every gateway process)."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from appliance.gateway.upstream import EngineRouter
from appliance.lib.tasks import cancel
from appliance.registry.models import ServedModel
from appliance.settings import EngineRoute

log = logging.getLogger(__name__)


def served_routes(db: Engine) -> dict[str, list[EngineRoute]]:
    """Served name -> its current version's engines."""
    with Session(db) as session:
        return {
            row.served_name: [
                EngineRoute(
                    model=row.served_name,
                    url=engine["url"],
                    runner="pooling" if row.runner == "pooling" else "generate",
                    name=engine["name"],
                )
                for engine in row.engines
            ]
            for row in session.exec(select(ServedModel)).all()
        }


class RegistryRoutes:
    def __init__(self, db: Engine, router: EngineRouter, interval_s: float) -> None:
        self._db, self._router, self._interval_s = db, router, interval_s
        self._applied: dict[str, list[EngineRoute]] = {}
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        mapping = await asyncio.to_thread(served_routes, self._db)
        for name, routes in mapping.items():
            if routes != self._applied.get(name):
                self._router.set_model_routes(name, routes)
                log.info("registry: %s now served by %s", name, [route.url for route in routes])
        self._applied = mapping

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="registry-routes")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.refresh()
            except SQLAlchemyError as exc:  # the database is away for a moment: keep the routes we have
                log.warning("registry: reading the served models failed: %s", exc)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

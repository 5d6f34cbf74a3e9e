"""Liveness (``/healthz``), readiness (``/readyz``: 503 when an engine or the database is down) and
Prometheus metrics (``/metrics``: platform admins and operators, e.g. a service client with the operator
role, which Prometheus's ``oauth2`` scrape setting signs in with; ``/metrics/engines``: the engines' own, for
the same callers, see :mod:`appliance.telemetry.engine_metrics`)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from sqlalchemy import text
from sqlalchemy.engine import Engine

from appliance.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from appliance.gateway.upstream import EngineRouter
from appliance.identity.auth import Authenticator
from appliance.identity.sessions import SESSION_COOKIE
from appliance.lib.guards import requires, requires_platform
from appliance.lib.principal import ADMIN, OPERATOR, Principal
from appliance.telemetry.engine_metrics import engine_metrics
from appliance.telemetry.monitor import ConcurrencyMonitor


def _database_ok(engine: Engine) -> bool:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return True


async def _optional_principal(request: Request[Any, Any, Any], authenticator: Authenticator) -> Principal | None:
    """The caller of a public path, when it sent a credential (checked as on protected paths)."""
    authorization = request.headers.get("authorization")
    session = request.cookies.get(SESSION_COOKIE)
    if not authorization and not session:
        return None
    return await authenticator.authenticate(authorization, session_cookie=session, method=request.method)


METRICS_READERS = [
    requires_platform(ADMIN, OPERATOR, why="Metrics cover every tenant: only platform admins and operators read them.")
]
HEALTH_READERS = [requires(ADMIN, OPERATOR)]


class HealthController(Controller):
    @get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz")
    async def readyz(
        self,
        request: Request[Any, Any, Any],
        authenticator: NamedDependency[Authenticator],
        router: NamedDependency[EngineRouter],
        db_engine: NamedDependency[Engine],
        monitor: NamedDependency[ConcurrencyMonitor],
    ) -> Response[dict[str, Any]]:
        """The status code for anyone (200 ready, 503 not: what probes read). Platform admins and operators also
        get the detail (engines, their URLs and errors, the database, concurrency); other signed-in callers the
        served models and whether each is up (the console's playground picks its models so), no URL, no error.
        A credential that is sent must be valid (401)."""
        principal = await _optional_principal(request, authenticator)
        engines, database = await asyncio.gather(
            router.health_all(), asyncio.to_thread(_database_ok, db_engine), return_exceptions=True
        )
        engine_rows = (
            [
                {"model": h.model, "url": h.url, "runner": h.runner, "healthy": h.healthy, "error": h.error}
                for h in engines
            ]
            if isinstance(engines, list)
            else []
        )
        database_ok = database is True
        ready = database_ok and bool(engine_rows) and all(row["healthy"] for row in engine_rows)
        status = "ready" if ready else "unready"
        code = 200 if ready else 503
        if principal is None:
            return Response(content={"status": status}, status_code=code)
        if not principal.is_platform:
            models = [{key: row[key] for key in ("model", "runner", "healthy")} for row in engine_rows]
            return Response(content={"status": status, "engines": models}, status_code=code)
        body = {
            "status": status,
            "database": {"healthy": database_ok},
            "engines": engine_rows,
            # Overload is not unreadiness (the engines answer); it is reported for whoever balances load.
            "concurrency": {
                "state": (report := monitor.report())["state"],
                "engines": {model: e["state"] for model, e in report["engines"].items()},
            },
        }
        return Response(content=body, status_code=code)

    @get("/metrics", guards=METRICS_READERS)
    async def metrics(self, metrics: NamedDependency[GatewayMetrics]) -> Response[bytes]:
        return Response(content=metrics.render(), media_type=CONTENT_TYPE)

    @get("/metrics/engines", guards=METRICS_READERS)
    async def engines_metrics(self, router: NamedDependency[EngineRouter]) -> Response[bytes]:
        """Every engine's own Prometheus metrics (vLLM's ``vllm:*``), labelled with ``engine`` and ``model``."""
        return Response(content=await engine_metrics(router), media_type=CONTENT_TYPE)

    @get("/admin/health/concurrency", guards=HEALTH_READERS)
    async def concurrency(self, monitor: NamedDependency[ConcurrencyMonitor]) -> dict[str, Any]:
        """The concurrency health signal per engine and overall, with its reasons and inputs."""
        return monitor.report()

    @get("/admin/health/history", guards=HEALTH_READERS)
    async def history(
        self,
        monitor: NamedDependency[ConcurrencyMonitor],
        engine: Annotated[str | None, QueryParameter(max_length=200)] = None,
        since: Annotated[datetime | None, QueryParameter(name="from")] = None,
        until: Annotated[datetime | None, QueryParameter(name="to")] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=10_080)] = 1440,
    ) -> dict[str, Any]:
        """Per-minute roll-ups of every engine (or one), oldest first: the last ``limit`` minutes of the period."""
        if monitor.rollups is None:
            return {"object": "list", "data": []}
        rows = await asyncio.to_thread(monitor.rollups.history, engine, since, until, limit)
        return {"object": "list", "data": rows}

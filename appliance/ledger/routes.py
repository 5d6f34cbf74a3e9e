"""Admin API of usage and cost: grouped reports (JSON or CSV) and single requests.

``GET /admin/usage/?group_by=tenant|workflow|agent|model|key&from=&to=&bucket=hour|day&format=json|csv``
``GET /admin/usage/requests?from=&to=&limit=&offset=&format=json|csv``
Periods default to the last 24 hours. A principal bound to a tenant sees only its tenant's usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from litestar import Controller, Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromQuery, QueryParameter
from sqlalchemy.engine import Engine

from appliance.ledger.report import COLUMNS, RECORD_COLUMNS, to_csv, usage_records, usage_report
from appliance.lib.errors import InvalidRequestError
from appliance.lib.guards import CurrentPrincipal, requires
from appliance.lib.principal import ADMIN, OPERATOR, Principal
from appliance.lib.times import as_utc
from appliance.settings import Settings

From = Annotated[datetime | None, QueryParameter(name="from", description="start (ISO 8601), inclusive")]
To = Annotated[datetime | None, QueryParameter(name="to", description="end (ISO 8601), exclusive")]
Format = Annotated[Literal["json", "csv"], QueryParameter(name="format")]
MAX_SPAN = timedelta(days=366)


def _period(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    end = as_utc(end) if end else datetime.now(UTC)
    start = as_utc(start) if start else end - timedelta(days=1)
    if start >= end:
        raise InvalidRequestError("`from` must be before `to`.", param="from")
    if end - start > MAX_SPAN:
        raise InvalidRequestError("A report covers at most 366 days.", param="from")
    return start, end


async def _read(
    request: Request[Any, Any, Any],
    principal: Principal,
    start: datetime | None,
    end: datetime | None,
    query: Callable[..., list[dict[str, Any]]],
    engine: Engine,
    **options: Any,
) -> tuple[datetime, datetime, list[dict[str, Any]]]:
    """Run a ledger query over the asked period, within the principal's tenant."""
    since, until = _period(start, end)
    writer = getattr(request.app.state, "usage", None)
    if writer is not None:
        await writer.flush()  # what this process answered before the report is in it
    rows = await asyncio.to_thread(query, engine, start=since, end=until, tenant_id=principal.tenant_id, **options)
    return since, until, rows


def _csv(body: str, name: str) -> Response[str]:
    return Response(
        content=body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


class UsageController(Controller):
    path = "/admin/usage"
    guards = [requires(ADMIN, OPERATOR)]

    @get("/")
    async def report(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        db_engine: NamedDependency[Engine],
        settings: NamedDependency[Settings],
        group_by: FromQuery[Literal["tenant", "workflow", "agent", "model", "key"]] = "tenant",
        start: From = None,
        end: To = None,
        bucket: FromQuery[Literal["hour", "day"] | None] = None,
        output: Format = "json",
    ) -> Response[Any]:
        zone = ZoneInfo(settings.budgets.timezone)
        since, until, rows = await _read(
            request, principal, start, end, usage_report, db_engine, group_by=group_by, zone=zone, bucket=bucket
        )
        if output == "csv":
            return _csv(to_csv(rows, COLUMNS), f"usage-by-{group_by}")
        return Response(
            content={
                "object": "usage_report",
                "group_by": group_by,
                "bucket": bucket,
                "from": since.isoformat(),
                "to": until.isoformat(),
                "currency": settings.pricing.currency,
                "data": rows,
            }
        )

    @get("/requests")
    async def requests(
        self,
        request: Request[Any, Any, Any],
        principal: CurrentPrincipal,
        db_engine: NamedDependency[Engine],
        settings: NamedDependency[Settings],
        start: From = None,
        end: To = None,
        limit: Annotated[int, QueryParameter(ge=1, le=10_000)] = 100,
        offset: Annotated[int, QueryParameter(ge=0, le=2**31 - 1)] = 0,
        output: Format = "json",
    ) -> Response[Any]:
        _since, _until, rows = await _read(
            request, principal, start, end, usage_records, db_engine, limit=limit, offset=offset
        )
        if output == "csv":
            return _csv(to_csv(rows, RECORD_COLUMNS), "usage-requests")
        return Response(content={"object": "list", "currency": settings.pricing.currency, "data": rows})

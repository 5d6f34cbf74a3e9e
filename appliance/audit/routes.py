"""The audit trail for auditors and admins: search and chain verification."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import FromQuery, QueryParameter

from appliance.audit.writer import AuditWriter
from appliance.lib.errors import InvalidRequestError, PermissionDeniedError
from appliance.lib.principal import ADMIN, AUDITOR, principal_of

Limit = Annotated[int, QueryParameter(ge=1, le=500)]
Offset = Annotated[int, QueryParameter(ge=0, le=2**31 - 1)]  # an offset past a 64-bit integer was a 500


class AuditController(Controller):
    path = "/admin/audit"

    @get("/")
    async def search(
        self,
        request: Request[Any, Any, Any],
        audit: NamedDependency[AuditWriter],
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        subject: FromQuery[str | None] = None,
        event_type: FromQuery[str | None] = None,
        outcome: FromQuery[str | None] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        principal = principal_of(request.scope)
        principal.require_role(AUDITOR, ADMIN)
        for name, moment in (("since", since), ("until", until)):
            if moment is not None and moment.utcoffset() is None:
                raise InvalidRequestError(
                    f"`{name}` needs a time zone (for example 2026-01-01T00:00:00Z): the audit trail is in UTC, "
                    "and a time without one is ambiguous.",
                    param=name,
                )
        return await asyncio.to_thread(
            audit.store.search,
            since=since,
            until=until,
            subject=subject,
            event_type=event_type,
            outcome=outcome,
            tenant_id=principal.tenant_id,
            limit=limit,
            offset=offset,
        )

    @get("/verify")
    async def verify(self, request: Request[Any, Any, Any], audit: NamedDependency[AuditWriter]) -> dict[str, Any]:
        principal = principal_of(request.scope)
        principal.require_role(AUDITOR, ADMIN)
        if principal.tenant_id is not None:
            raise PermissionDeniedError("The chain covers every tenant: only platform auditors verify it.")
        result = await asyncio.to_thread(audit.store.verify)
        return result.as_dict()

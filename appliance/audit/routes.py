"""The audit trail for auditors and admins: search, verification, and for outside auditors the signed
checkpoint, inclusion and consistency proofs, and a witness's add-checkpoint request."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.params import FromQuery, QueryParameter

from appliance.audit.merkle import ProofError
from appliance.audit.setup import cosigned_checkpoints
from appliance.audit.tree import TreeError
from appliance.audit.writer import AuditWriter
from appliance.lib.errors import InvalidRequestError, NotFoundError
from appliance.lib.guards import CurrentPrincipal, requires, requires_platform
from appliance.lib.principal import ADMIN, AUDITOR
from appliance.settings import Settings

Limit = Annotated[int, QueryParameter(ge=1, le=500)]
Offset = Annotated[int, QueryParameter(ge=0, le=2**31 - 1)]  # an offset past a 64-bit integer was a 500
SEQ_MAX = 2**63 - 1  # a sequence number or tree size past a 64-bit integer was a 500 (schemathesis found it)
Size = Annotated[int, QueryParameter(ge=0, le=SEQ_MAX)]
OptionalSize = Annotated[int | None, QueryParameter(ge=0, le=SEQ_MAX)]


AUDITORS = [requires(AUDITOR, ADMIN)]  # a tenant-bound auditor reads its tenant's records
TREE_READERS = [
    requires_platform(AUDITOR, ADMIN, why="The log covers every tenant: only platform auditors read its tree.")
]
VERIFIERS = [requires_platform(AUDITOR, ADMIN, why="The chain covers every tenant: only platform auditors verify it.")]


async def _prove(call: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(call, *args)
    except (ProofError, TreeError) as exc:
        raise InvalidRequestError(str(exc)) from None


class AuditController(Controller):
    path = "/admin/audit"

    @get("/", guards=AUDITORS)
    async def search(
        self,
        principal: CurrentPrincipal,
        audit: NamedDependency[AuditWriter],
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        subject: FromQuery[str | None] = None,
        event_type: FromQuery[str | None] = None,
        outcome: FromQuery[str | None] = None,
        limit: Limit = 100,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        for name, moment in (("since", since), ("until", until)):
            if moment is not None and moment.utcoffset() is None:
                raise InvalidRequestError(
                    f"`{name}` needs a time zone (for example 2026-01-01T00:00:00Z): the audit trail is in UTC, "
                    "and a time without one is ambiguous.",
                    param=name,
                )
        await audit.flush()  # what was answered before this search is found by it
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

    @get("/verify", guards=VERIFIERS)
    async def verify(self, audit: NamedDependency[AuditWriter]) -> dict[str, Any]:
        await audit.flush()
        result = await asyncio.to_thread(audit.store.verify)
        return result.as_dict()

    @get("/checkpoint", guards=TREE_READERS)
    async def checkpoint(self, audit: NamedDependency[AuditWriter]) -> dict[str, Any]:
        """The newest signed checkpoint (C2SP tlog-checkpoint) and the key that verifies it (a C2SP vkey)."""
        await audit.flush()
        await asyncio.to_thread(audit.store.settle)  # a checkpoint the flush made due is signed by now
        latest = await asyncio.to_thread(audit.store.latest_checkpoint)
        if latest is None:
            raise NotFoundError("No checkpoint is signed yet.")
        return latest

    @get("/proof/inclusion", guards=TREE_READERS)
    async def inclusion(
        self,
        audit: NamedDependency[AuditWriter],
        seq: Annotated[int, QueryParameter(ge=1, le=SEQ_MAX)],
        size: OptionalSize = None,
    ) -> dict[str, Any]:
        """RFC 6962 inclusion proof of record ``seq`` in the tree of ``size`` records (default: the newest
        checkpoint's)."""
        result: dict[str, Any] = await _prove(audit.store.prove_inclusion, seq, size)
        return result

    @get("/proof/consistency", guards=TREE_READERS)
    async def consistency(
        self,
        audit: NamedDependency[AuditWriter],
        old: Annotated[int, QueryParameter(ge=1, le=SEQ_MAX)],
        size: OptionalSize = None,
    ) -> dict[str, Any]:
        """RFC 6962 consistency proof from the tree of ``old`` records to that of ``size`` (default: newest)."""
        result: dict[str, Any] = await _prove(audit.store.prove_consistency, old, size)
        return result

    @get("/witnessed", guards=TREE_READERS)
    async def witnessed(
        self, audit: NamedDependency[AuditWriter], settings: NamedDependency[Settings]
    ) -> list[dict[str, Any]]:
        """Each trusted witness's newest co-signed checkpoint (imported with ``appliance audit witness-import``)
        and whether this database still holds the tree it states (``problem`` says why not)."""
        rows: list[dict[str, Any]] = await asyncio.to_thread(cosigned_checkpoints(settings, audit.store).listing)
        return rows

    @get("/witness", guards=TREE_READERS)
    async def witness(self, audit: NamedDependency[AuditWriter], old: Size = 0) -> Response[str]:
        """The body of a C2SP tlog-witness add-checkpoint request for the newest checkpoint, from the size the
        witness last co-signed (``old``), to carry to a witness."""
        body: str = await _prove(audit.store.witness_request, old)
        return Response(content=body, media_type="text/plain")  # Litestar adds the charset (utf-8) itself

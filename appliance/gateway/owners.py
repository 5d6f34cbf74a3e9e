"""Tenant isolation of stored responses: who created each one, checked before any engine is asked about it.

vLLM keeps a stored response in the memory of the engine that made it (``VLLM_ENABLE_RESPONSES_API_STORE``) and
serves it to anyone who knows its id. The gateway names every response before the engine makes it, records the
tenant, key and engine here, and answers 404 for an id that another tenant created (or that it never saw),
exactly as for an id that does not exist, so ids cannot be probed across tenants.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.gateway.models import StoredResponse
from appliance.lib.errors import NotFoundError
from appliance.lib.principal import Principal


class ResponseNotFoundError(NotFoundError):
    code = "response_not_found"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(f"No response with id `{response_id[:100]}` was found.", param=param)


class ResponseOwners:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def record(self, owned: StoredResponse) -> None:
        await asyncio.to_thread(self._insert, owned)

    def _insert(self, owned: StoredResponse) -> None:
        with Session(self._engine) as session:
            session.add(owned)
            session.commit()

    async def find(self, response_id: str, principal: Principal, param: str | None = None) -> StoredResponse:
        """The record of ``response_id`` if the principal's tenant created it; 404 otherwise."""
        found = await asyncio.to_thread(self._get, response_id)
        if found is None or principal.tenant_id is None or found.tenant_id != principal.tenant_id:
            raise ResponseNotFoundError(response_id, param)
        return found

    def _get(self, response_id: str) -> StoredResponse | None:
        with Session(self._engine) as session:
            found = session.get(StoredResponse, response_id)
            if found is not None:
                session.expunge(found)
            return found

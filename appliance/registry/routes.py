"""``/admin/models``: the registry over HTTP. Administrators change it; operators read it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.lib.errors import ConflictError
from appliance.lib.guards import CurrentPrincipal, requires
from appliance.lib.principal import ADMIN, OPERATOR, Principal
from appliance.registry import deploy, service
from appliance.registry.importer import import_model
from appliance.registry.models import APPROVED
from appliance.registry.options import parse_options
from appliance.settings import Settings

log = logging.getLogger(__name__)

Db = NamedDependency[Engine]
Req = Request[Any, Any, Any]


class ImportRequest(BaseModel):
    source: str = Field(description="a model folder or .gguf file on this node (offline media, a local folder)")
    served_name: str
    options: dict[str, Any] = Field(default_factory=dict)
    runner: str | None = None
    engine_kind: str = "vllm"


ADMINS = [requires(ADMIN)]  # change the registry
READERS = [requires(ADMIN, OPERATOR)]  # read it


def actor_of(principal: Principal) -> str:
    return principal.username or principal.subject


def _in_background(request: Req, name: str, work: Any, *args: Any) -> None:
    """Deployments take minutes (an engine starting): they run on after the answer, logged when they end."""
    tasks: set[asyncio.Task[Any]] = request.app.state.setdefault("registry_tasks", set())

    async def run() -> None:
        try:
            await asyncio.to_thread(work, *args)
        except Exception:
            log.exception("registry: %s failed", name)

    task = asyncio.create_task(run(), name=name)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


class ModelController(Controller):
    path = "/admin/models"

    @get("/", sync_to_thread=True, guards=READERS)
    def list_versions(self, db_engine: Db) -> dict[str, Any]:
        with Session(db_engine) as session:
            return {"data": service.list_versions(session), "served": service.served_models(session)}

    @get("/{version_id:int}", sync_to_thread=True, guards=READERS)
    def show(self, db_engine: Db, version_id: FromPath[int]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.show(session, version_id)

    @post("/", sync_to_thread=True, status_code=201, guards=ADMINS)
    def import_version(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        settings: NamedDependency[Settings],
        data: JSONBody[ImportRequest],
    ) -> dict[str, Any]:
        actor = actor_of(principal)
        options = parse_options(data.options)
        with Session(db_engine) as session:
            version = import_model(
                session,
                settings,
                Path(data.source),
                data.served_name,
                actor,
                options,
                runner=data.runner,
                engine_kind=data.engine_kind,
            )
            return service.show(session, version.id or 0)

    @post("/{version_id:int}/approve", sync_to_thread=True, status_code=200, guards=ADMINS)
    def approve(
        self, principal: CurrentPrincipal, db_engine: Db, settings: NamedDependency[Settings], version_id: FromPath[int]
    ) -> dict[str, Any]:
        actor = actor_of(principal)
        with Session(db_engine) as session:
            service.approve(session, settings, version_id, actor)
            return service.show(session, version_id)

    @post("/{version_id:int}/deploy", status_code=202, guards=ADMINS)
    async def deploy_version(
        self,
        request: Req,
        principal: CurrentPrincipal,
        db_engine: Db,
        settings: NamedDependency[Settings],
        version_id: FromPath[int],
    ) -> dict[str, Any]:
        """Starts the version's engines; the name switches once they are healthy (see the version's state)."""
        actor = actor_of(principal)
        with Session(db_engine) as session:
            version = service.get_version(session, version_id)
            if version.state != APPROVED:
                raise ConflictError(f"{version.served_name} v{version.version} is {version.state}, not approved")
        _in_background(request, f"deploy {version_id}", deploy.deploy, db_engine, settings, version_id, actor)
        return {"version_id": version_id, "status": "deploying"}

    @post("/served/{served_name:str}/rollback", status_code=202, guards=ADMINS)
    async def rollback(
        self,
        request: Req,
        principal: CurrentPrincipal,
        db_engine: Db,
        settings: NamedDependency[Settings],
        served_name: FromPath[str],
    ) -> dict[str, Any]:
        actor = actor_of(principal)
        _in_background(request, f"rollback {served_name}", deploy.rollback, db_engine, settings, served_name, actor)
        return {"served_name": served_name, "status": "rolling back"}

    @post("/{version_id:int}/retire", sync_to_thread=True, status_code=200, guards=ADMINS)
    def retire(
        self, principal: CurrentPrincipal, db_engine: Db, settings: NamedDependency[Settings], version_id: FromPath[int]
    ) -> dict[str, Any]:
        actor = actor_of(principal)
        with Session(db_engine) as session:
            service.retire(session, settings, version_id, actor)
            return service.show(session, version_id)

    @delete("/{version_id:int}/files", sync_to_thread=True, status_code=200, guards=ADMINS)
    def remove_files(
        self, principal: CurrentPrincipal, db_engine: Db, settings: NamedDependency[Settings], version_id: FromPath[int]
    ) -> dict[str, Any]:
        actor = actor_of(principal)
        with Session(db_engine) as session:
            service.remove_files(session, settings, version_id, actor)
            return service.show(session, version_id)

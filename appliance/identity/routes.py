"""Admin API of the identity domain: /admin/tenants, workflows, agents, users, api-keys.

Thin routes: the rules (roles, tenant isolation) live in :mod:`appliance.identity.service`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.audit.middleware import add_audit_detail
from appliance.audit.writer import AuditWriter
from appliance.identity import service
from appliance.identity.apikeys import KeyHasher
from appliance.identity.auth import Authenticator
from appliance.identity.models import Agent, ApiKey, ServiceClient, Tenant, User, Workflow
from appliance.identity.removal import RemovalHooks
from appliance.identity.schemas import (
    AgentCreate,
    ApiKeyCreate,
    Rename,
    ServiceClientCreate,
    TenantCreate,
    TenantUpdate,
    WorkflowCreate,
)
from appliance.identity.tenancy import TenantPolicies
from appliance.lib.principal import ADMIN, principal_of

Limit = Annotated[int, QueryParameter(ge=1, le=200)]
Offset = Annotated[int, QueryParameter(ge=0, le=2**31 - 1)]  # an offset past a 64-bit integer was a 500
Db = NamedDependency[Engine]
Req = Request[Any, Any, Any]


class AdminController(Controller):
    path = "/admin"

    # -- tenants -------------------------------------------------------------------------------------

    @get("/tenants", sync_to_thread=True)
    def list_tenants(self, request: Req, db_engine: Db, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(
                session, principal_of(request.scope), Tenant, tenant_id=None, limit=limit, offset=offset
            )

    @post("/tenants", sync_to_thread=True)
    def create_tenant(self, request: Req, db_engine: Db, data: JSONBody[TenantCreate]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.create_tenant(session, principal_of(request.scope), data)

    @get("/tenants/{item_id:str}", sync_to_thread=True)
    def get_tenant(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal_of(request.scope), Tenant, item_id)

    @patch("/tenants/{item_id:str}", sync_to_thread=True)
    def update_tenant(
        self,
        request: Req,
        db_engine: Db,
        tenant_policies: NamedDependency[TenantPolicies],
        item_id: FromPath[str],
        data: JSONBody[TenantUpdate],
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            updated = service.rename(session, principal_of(request.scope), Tenant, item_id, data)
        tenant_policies.changed(item_id)  # here at once; in other processes within a second
        return updated

    @delete("/tenants/{item_id:str}")
    async def delete_tenant(
        self,
        request: Req,
        db_engine: Db,
        removal: NamedDependency[RemovalHooks],
        audit: NamedDependency[AuditWriter],
        item_id: FromPath[str],
    ) -> None:
        """The tenant and what it stored: its vector collections (points first), its rows (cascade), and its
        captured prompts and answers."""
        principal = principal_of(request.scope)

        def check() -> None:
            with Session(db_engine) as session:
                principal.require_role(ADMIN)
                service.get_owned(session, principal, Tenant, item_id)
                removal.check(session, principal, "tenant", item_id)

        def remove() -> None:
            with Session(db_engine) as session:
                service.delete(session, principal, Tenant, item_id)

        await asyncio.to_thread(check)
        await removal.forget_tenant(item_id)
        await asyncio.to_thread(remove)
        await asyncio.to_thread(audit.store.forget_tenant_content, item_id)
        try:
            await audit.flush()  # captured text still on its way to the database goes too
        finally:
            await asyncio.to_thread(audit.store.forget_tenant_content, item_id)

    # -- workflows -----------------------------------------------------------------------------------

    @get("/workflows", sync_to_thread=True)
    def list_workflows(
        self,
        request: Req,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            principal = principal_of(request.scope)
            return service.page(session, principal, Workflow, tenant_id=tenant_id, limit=limit, offset=offset)

    @post("/workflows", sync_to_thread=True)
    def create_workflow(self, request: Req, db_engine: Db, data: JSONBody[WorkflowCreate]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.create_workflow(session, principal_of(request.scope), data)

    @get("/workflows/{item_id:str}", sync_to_thread=True)
    def get_workflow(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal_of(request.scope), Workflow, item_id)

    @patch("/workflows/{item_id:str}", sync_to_thread=True)
    def update_workflow(
        self, request: Req, db_engine: Db, item_id: FromPath[str], data: JSONBody[Rename]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.rename(session, principal_of(request.scope), Workflow, item_id, data)

    @delete("/workflows/{item_id:str}", sync_to_thread=True)
    def delete_workflow(
        self, request: Req, db_engine: Db, removal: NamedDependency[RemovalHooks], item_id: FromPath[str]
    ) -> None:
        principal = principal_of(request.scope)
        with Session(db_engine) as session:
            principal.require_role(ADMIN)
            service.get_owned(session, principal, Workflow, item_id)
            removal.check(session, principal, "workflow", item_id)
            service.delete(session, principal, Workflow, item_id)

    # -- agents --------------------------------------------------------------------------------------

    @get("/agents", sync_to_thread=True)
    def list_agents(
        self,
        request: Req,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        workflow_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(
                session,
                principal_of(request.scope),
                Agent,
                tenant_id=tenant_id,
                limit=limit,
                offset=offset,
                workflow_id=workflow_id,
            )

    @post("/agents", sync_to_thread=True)
    def create_agent(self, request: Req, db_engine: Db, data: JSONBody[AgentCreate]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.create_agent(session, principal_of(request.scope), data)

    @get("/agents/{item_id:str}", sync_to_thread=True)
    def get_agent(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal_of(request.scope), Agent, item_id)

    @patch("/agents/{item_id:str}", sync_to_thread=True)
    def update_agent(
        self, request: Req, db_engine: Db, item_id: FromPath[str], data: JSONBody[Rename]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.rename(session, principal_of(request.scope), Agent, item_id, data)

    @delete("/agents/{item_id:str}", sync_to_thread=True)
    def delete_agent(
        self, request: Req, db_engine: Db, removal: NamedDependency[RemovalHooks], item_id: FromPath[str]
    ) -> None:
        principal = principal_of(request.scope)
        with Session(db_engine) as session:
            principal.require_role(ADMIN)
            service.get_owned(session, principal, Agent, item_id)
            removal.check(session, principal, "agent", item_id)
            service.delete(session, principal, Agent, item_id)

    # -- users ---------------------------------------------------------------------------------------

    @get("/users", sync_to_thread=True)
    def list_users(
        self,
        request: Req,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            principal = principal_of(request.scope)
            return service.page(session, principal, User, tenant_id=tenant_id, limit=limit, offset=offset)

    @get("/users/{item_id:str}", sync_to_thread=True)
    def get_user(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal_of(request.scope), User, item_id)

    @post("/users/{item_id:str}/sign-out", status_code=200, sync_to_thread=True)
    def sign_out_user(
        self, request: Req, db_engine: Db, authenticator: NamedDependency[Authenticator], item_id: FromPath[str]
    ) -> dict[str, Any]:
        """End every console session of this user, whichever identity provider it signed in with."""
        add_audit_detail(request.scope, action="sign_out")
        principal = principal_of(request.scope)
        principal.require_role(ADMIN)
        with Session(db_engine) as session:
            service.get_owned(session, principal, User, item_id)
        return {"id": item_id, "signed_out": authenticator.sessions.end_all(user_id=item_id)}

    @delete("/users/{item_id:str}", sync_to_thread=True)
    def delete_user(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> None:
        with Session(db_engine) as session:
            service.delete(session, principal_of(request.scope), User, item_id)

    # -- API keys ------------------------------------------------------------------------------------

    @get("/api-keys", sync_to_thread=True)
    def list_api_keys(
        self,
        request: Req,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        workflow_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(
                session,
                principal_of(request.scope),
                ApiKey,
                tenant_id=tenant_id,
                limit=limit,
                offset=offset,
                workflow_id=workflow_id,
            )

    @post("/api-keys", sync_to_thread=True)
    def create_api_key(
        self, request: Req, db_engine: Db, key_hasher: NamedDependency[KeyHasher], data: JSONBody[ApiKeyCreate]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            record, secret = service.create_api_key(session, principal_of(request.scope), key_hasher, data)
        return {**record, "key": secret}

    @get("/api-keys/{item_id:str}", sync_to_thread=True)
    def get_api_key(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal_of(request.scope), ApiKey, item_id)

    @delete("/api-keys/{item_id:str}", status_code=200, sync_to_thread=True)
    def revoke_api_key(
        self, request: Req, db_engine: Db, authenticator: NamedDependency[Authenticator], item_id: FromPath[str]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            revoked = service.revoke(session, principal_of(request.scope), ApiKey, item_id)
        authenticator.key_revoked(item_id)
        return revoked

    # -- service clients (client_credentials) --------------------------------------------------------

    @get("/service-clients", sync_to_thread=True)
    def list_service_clients(
        self,
        request: Req,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            principal = principal_of(request.scope)
            return service.page(session, principal, ServiceClient, tenant_id=tenant_id, limit=limit, offset=offset)

    @post("/service-clients", sync_to_thread=True)
    def create_service_client(
        self, request: Req, db_engine: Db, key_hasher: NamedDependency[KeyHasher], data: JSONBody[ServiceClientCreate]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            record, secret = service.create_service_client(session, principal_of(request.scope), key_hasher, data)
        return {**record, "client_id": record["id"], "client_secret": secret}

    @delete("/service-clients/{item_id:str}", status_code=200, sync_to_thread=True)
    def revoke_service_client(self, request: Req, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.revoke(session, principal_of(request.scope), ServiceClient, item_id)

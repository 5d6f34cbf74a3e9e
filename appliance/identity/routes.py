"""Admin API of the identity domain: /admin/tenants, workflows, agents, users, api-keys.

Thin routes: each declares its role rule as a guard; the service functions (which the CLI calls too) check
the roles again and keep the rules on the data (tenant isolation) in :mod:`appliance.identity.service`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.audit.middleware import audit_action
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
from appliance.lib.guards import CurrentPrincipal, requires
from appliance.lib.principal import ADMIN

Limit = Annotated[int, QueryParameter(ge=1, le=200)]
Offset = Annotated[int, QueryParameter(ge=0, le=2**31 - 1)]  # an offset past a 64-bit integer was a 500
Db = NamedDependency[Engine]
ADMINS = [requires(ADMIN)]  # changes
READERS = [requires(*service.READERS)]  # reads


class AdminController(Controller):
    path = "/admin"

    # -- tenants -------------------------------------------------------------------------------------

    @get("/tenants", sync_to_thread=True, guards=READERS)
    def list_tenants(
        self, principal: CurrentPrincipal, db_engine: Db, limit: Limit = 50, offset: Offset = 0
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(session, principal, Tenant, tenant_id=None, limit=limit, offset=offset)

    @post("/tenants", sync_to_thread=True, guards=ADMINS)
    def create_tenant(self, principal: CurrentPrincipal, db_engine: Db, data: JSONBody[TenantCreate]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.create_tenant(session, principal, data)

    @get("/tenants/{item_id:str}", sync_to_thread=True, guards=READERS)
    def get_tenant(self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal, Tenant, item_id)

    @patch("/tenants/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def update_tenant(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        tenant_policies: NamedDependency[TenantPolicies],
        item_id: FromPath[str],
        data: JSONBody[TenantUpdate],
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            updated = service.rename(session, principal, Tenant, item_id, data)
        tenant_policies.changed(item_id)  # here at once; in other processes within a second
        return updated

    @delete("/tenants/{item_id:str}", guards=ADMINS)
    async def delete_tenant(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        removal: NamedDependency[RemovalHooks],
        audit: NamedDependency[AuditWriter],
        item_id: FromPath[str],
    ) -> None:
        """The tenant and what it stored: its vector collections (points first), its rows (cascade), and its
        captured prompts and answers."""

        def check() -> None:
            with Session(db_engine) as session:
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

    @get("/workflows", sync_to_thread=True, guards=READERS)
    def list_workflows(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(session, principal, Workflow, tenant_id=tenant_id, limit=limit, offset=offset)

    @post("/workflows", sync_to_thread=True, guards=ADMINS)
    def create_workflow(
        self, principal: CurrentPrincipal, db_engine: Db, data: JSONBody[WorkflowCreate]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.create_workflow(session, principal, data)

    @get("/workflows/{item_id:str}", sync_to_thread=True, guards=READERS)
    def get_workflow(self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal, Workflow, item_id)

    @patch("/workflows/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def update_workflow(
        self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str], data: JSONBody[Rename]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.rename(session, principal, Workflow, item_id, data)

    @delete("/workflows/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def delete_workflow(
        self, principal: CurrentPrincipal, db_engine: Db, removal: NamedDependency[RemovalHooks], item_id: FromPath[str]
    ) -> None:
        with Session(db_engine) as session:
            service.get_owned(session, principal, Workflow, item_id)
            removal.check(session, principal, "workflow", item_id)
            service.delete(session, principal, Workflow, item_id)

    # -- agents --------------------------------------------------------------------------------------

    @get("/agents", sync_to_thread=True, guards=READERS)
    def list_agents(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        workflow_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(
                session,
                principal,
                Agent,
                tenant_id=tenant_id,
                limit=limit,
                offset=offset,
                workflow_id=workflow_id,
            )

    @post("/agents", sync_to_thread=True, guards=ADMINS)
    def create_agent(self, principal: CurrentPrincipal, db_engine: Db, data: JSONBody[AgentCreate]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.create_agent(session, principal, data)

    @get("/agents/{item_id:str}", sync_to_thread=True, guards=READERS)
    def get_agent(self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal, Agent, item_id)

    @patch("/agents/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def update_agent(
        self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str], data: JSONBody[Rename]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.rename(session, principal, Agent, item_id, data)

    @delete("/agents/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def delete_agent(
        self, principal: CurrentPrincipal, db_engine: Db, removal: NamedDependency[RemovalHooks], item_id: FromPath[str]
    ) -> None:
        with Session(db_engine) as session:
            service.get_owned(session, principal, Agent, item_id)
            removal.check(session, principal, "agent", item_id)
            service.delete(session, principal, Agent, item_id)

    # -- users ---------------------------------------------------------------------------------------

    @get("/users", sync_to_thread=True, guards=READERS)
    def list_users(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(session, principal, User, tenant_id=tenant_id, limit=limit, offset=offset)

    @get("/users/{item_id:str}", sync_to_thread=True, guards=READERS)
    def get_user(self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal, User, item_id)

    @post(
        "/users/{item_id:str}/sign-out",
        status_code=200,
        sync_to_thread=True,
        guards=ADMINS,
        opt=audit_action("sign_out"),
    )
    def sign_out_user(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        authenticator: NamedDependency[Authenticator],
        item_id: FromPath[str],
    ) -> dict[str, Any]:
        """End every console session of this user, whichever identity provider it signed in with."""
        with Session(db_engine) as session:
            service.get_owned(session, principal, User, item_id)
        return {"id": item_id, "signed_out": authenticator.sessions.end_all(user_id=item_id)}

    @delete("/users/{item_id:str}", sync_to_thread=True, guards=ADMINS)
    def delete_user(self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]) -> None:
        with Session(db_engine) as session:
            service.delete(session, principal, User, item_id)

    # -- API keys ------------------------------------------------------------------------------------

    @get("/api-keys", sync_to_thread=True, guards=READERS)
    def list_api_keys(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        workflow_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(
                session,
                principal,
                ApiKey,
                tenant_id=tenant_id,
                limit=limit,
                offset=offset,
                workflow_id=workflow_id,
            )

    @post("/api-keys", sync_to_thread=True, guards=ADMINS)
    def create_api_key(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        key_hasher: NamedDependency[KeyHasher],
        data: JSONBody[ApiKeyCreate],
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            record, secret = service.create_api_key(session, principal, key_hasher, data)
        return {**record, "key": secret}

    @get("/api-keys/{item_id:str}", sync_to_thread=True, guards=READERS)
    def get_api_key(self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.read(session, principal, ApiKey, item_id)

    @delete("/api-keys/{item_id:str}", status_code=200, sync_to_thread=True, guards=ADMINS)
    def revoke_api_key(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        authenticator: NamedDependency[Authenticator],
        item_id: FromPath[str],
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            revoked = service.revoke(session, principal, ApiKey, item_id)
        authenticator.key_revoked(item_id)
        return revoked

    # -- service clients (client_credentials) --------------------------------------------------------

    @get("/service-clients", sync_to_thread=True, guards=READERS)
    def list_service_clients(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        tenant_id: FromQuery[str | None] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.page(session, principal, ServiceClient, tenant_id=tenant_id, limit=limit, offset=offset)

    @post("/service-clients", sync_to_thread=True, guards=ADMINS)
    def create_service_client(
        self,
        principal: CurrentPrincipal,
        db_engine: Db,
        key_hasher: NamedDependency[KeyHasher],
        data: JSONBody[ServiceClientCreate],
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            record, secret = service.create_service_client(session, principal, key_hasher, data)
        return {**record, "client_id": record["id"], "client_secret": secret}

    @delete("/service-clients/{item_id:str}", status_code=200, sync_to_thread=True, guards=ADMINS)
    def revoke_service_client(
        self, principal: CurrentPrincipal, db_engine: Db, item_id: FromPath[str]
    ) -> dict[str, Any]:
        with Session(db_engine) as session:
            return service.revoke(session, principal, ServiceClient, item_id)

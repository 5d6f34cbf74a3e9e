"""Tenants, workflows, agents, users and API keys: the identity domain's service functions.

Every function takes the acting principal: writes need ``admin``, reads ``admin`` or ``operator``, and a
tenant-bound principal only ever sees its own tenant (another tenant's id answers 404, never data).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, select

from appliance.identity.apikeys import KeyHasher, new_key_material
from appliance.identity.models import Agent, ApiKey, ServiceClient, Tenant, Workflow
from appliance.identity.oauth import new_client_secret
from appliance.identity.schemas import (
    AgentCreate,
    ApiKeyCreate,
    Rename,
    ServiceClientCreate,
    TenantCreate,
    TenantUpdate,
    WorkflowCreate,
)
from appliance.lib.errors import ConflictError, InvalidRequestError, NotFoundError
from appliance.lib.principal import ADMIN, OPERATOR, Principal
from appliance.lib.times import as_utc

ModelT = TypeVar("ModelT", bound=SQLModel)
READERS = (ADMIN, OPERATOR)
PUBLIC_KEY_FIELDS = ("secret_hash",)  # never leaves the service


def page(
    session: Session,
    principal: Principal,
    model: type[ModelT],
    *,
    tenant_id: str | None,
    limit: int,
    offset: int,
    **filters: str | None,
) -> dict[str, Any]:
    principal.require_role(*READERS)
    conditions = []
    scope = principal.tenant_scope(tenant_id) if model is not Tenant else principal.tenant_id
    if scope is not None:
        column = model.id if model is Tenant else model.tenant_id  # type: ignore[attr-defined]
        conditions.append(column == scope)
    for name, value in filters.items():
        if value is not None:
            conditions.append(getattr(model, name) == value)
    total = session.exec(select(func.count()).select_from(model).where(*conditions)).one()
    rows = session.exec(
        select(model).where(*conditions).order_by(model.created_at, model.id).offset(offset).limit(limit)  # type: ignore[attr-defined]
    ).all()
    return {"object": "list", "data": [public(row) for row in rows], "total": total, "limit": limit, "offset": offset}


def public(row: SQLModel) -> dict[str, Any]:
    return row.model_dump(exclude=set(PUBLIC_KEY_FIELDS))


def get_owned(session: Session, principal: Principal, model: type[ModelT], item_id: str) -> ModelT:
    row = session.get(model, item_id)
    if row is None:
        raise NotFoundError("No such resource.")
    principal.check_tenant(row.id if isinstance(row, Tenant) else row.tenant_id)  # type: ignore[attr-defined]
    return row


def read(session: Session, principal: Principal, model: type[ModelT], item_id: str) -> dict[str, Any]:
    principal.require_role(*READERS)
    return public(get_owned(session, principal, model, item_id))


def _commit(session: Session, row: SQLModel) -> dict[str, Any]:
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError("A resource with that name already exists here.", param="name") from None
    session.refresh(row)
    return public(row)


def create_tenant(session: Session, principal: Principal, data: TenantCreate) -> dict[str, Any]:
    principal.require_platform(ADMIN, why="Only a platform administrator creates tenants.")
    tenant = Tenant(
        name=data.name,
        description=data.description,
        content_capture=data.content_capture,
        allowed_models=_models(data.allowed_models),
    )
    return _commit(session, tenant)


def create_workflow(session: Session, principal: Principal, data: WorkflowCreate) -> dict[str, Any]:
    principal.require_role(ADMIN)
    tenant = get_owned(session, principal, Tenant, data.tenant_id)
    return _commit(session, Workflow(tenant_id=tenant.id, name=data.name, description=data.description))


def create_agent(session: Session, principal: Principal, data: AgentCreate) -> dict[str, Any]:
    principal.require_role(ADMIN)
    workflow = get_owned(session, principal, Workflow, data.workflow_id)
    return _commit(
        session,
        Agent(tenant_id=workflow.tenant_id, workflow_id=workflow.id, name=data.name, description=data.description),
    )


def rename(session: Session, principal: Principal, model: type[ModelT], item_id: str, data: Rename) -> dict[str, Any]:
    principal.require_role(ADMIN)
    row = get_owned(session, principal, model, item_id)
    if data.name is not None:
        row.name = data.name
    if data.description is not None:
        row.description = data.description
    if isinstance(data, TenantUpdate) and data.content_capture is not None:
        principal.require_platform(ADMIN, why="Only a platform administrator changes content capture.")
        row.content_capture = data.content_capture
    if isinstance(data, TenantUpdate) and data.allowed_models is not msgspec.UNSET:
        principal.require_platform(ADMIN, why="Only a platform administrator decides which models a tenant may use.")
        row.allowed_models = _models(data.allowed_models)
    return _commit(session, row)


def _models(names: list[str] | None) -> list[str] | None:
    return None if names is None else sorted(set(names))


def delete(session: Session, principal: Principal, model: type[ModelT], item_id: str) -> None:
    principal.require_role(ADMIN)
    row = get_owned(session, principal, model, item_id)
    session.delete(row)
    session.commit()


def create_api_key(
    session: Session, principal: Principal, hasher: KeyHasher, data: ApiKeyCreate
) -> tuple[dict[str, Any], str]:
    """The new key's public record and its secret, which is shown this once and never stored."""
    principal.require_role(ADMIN)
    workflow, _agent_id = _workflow_and_agent(session, principal, data.workflow_id, data.agent_id)
    expires_at = data.expires_at
    if expires_at is not None:
        expires_at = as_utc(expires_at)
        if expires_at <= datetime.now(UTC):
            raise InvalidRequestError("`expires_at` is in the past.", param="expires_at")
    key_id, secret, plaintext = new_key_material()
    key = ApiKey(
        id=key_id,
        name=data.name,
        secret_hash=hasher.digest(secret),
        tenant_id=workflow.tenant_id,
        workflow_id=workflow.id,
        agent_id=data.agent_id,
        scopes=sorted(set(data.scopes)),
        allowed_models=_models(data.allowed_models),
        expires_at=expires_at,
        created_by=principal.subject,
    )
    return _commit(session, key), plaintext


def _workflow_and_agent(
    session: Session, principal: Principal, workflow_id: str, agent_id: str | None
) -> tuple[Workflow, str | None]:
    workflow = get_owned(session, principal, Workflow, workflow_id)
    if agent_id is not None:
        agent = get_owned(session, principal, Agent, agent_id)
        if agent.workflow_id != workflow.id:
            raise InvalidRequestError("The agent does not belong to that workflow.", param="agent_id")
    return workflow, agent_id


def revoke(
    session: Session, principal: Principal, model: type[ApiKey] | type[ServiceClient], item_id: str
) -> dict[str, Any]:
    """Revoke a credential (kept for the record; it stops working on the next request)."""
    principal.require_role(ADMIN)
    row = get_owned(session, principal, model, item_id)
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    return _commit(session, row)


def create_service_client(
    session: Session, principal: Principal, hasher: KeyHasher, data: ServiceClientCreate
) -> tuple[dict[str, Any], str]:
    """A client_credentials client of a workflow; its secret is shown this once and never stored."""
    principal.require_role(ADMIN)
    workflow, agent_id = _workflow_and_agent(session, principal, data.workflow_id, data.agent_id)
    secret = new_client_secret()
    client = ServiceClient(
        secret_hash=hasher.digest(secret),
        tenant_id=workflow.tenant_id,
        workflow_id=workflow.id,
        agent_id=agent_id,
        roles=sorted(set(data.roles)),
        created_by=principal.subject,
    )
    return _commit(session, client), secret

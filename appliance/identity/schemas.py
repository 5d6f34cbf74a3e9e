"""Wire schemas of the identity admin API (separate from the tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Name = Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._\-]*$")]
Description = Annotated[str, Meta(max_length=1000)]
Id = Annotated[str, Meta(min_length=1, max_length=32)]
Scope = Literal["inference", "admin"]
ModelName = Annotated[str, Meta(min_length=1, max_length=200)]
Models = Annotated[list[ModelName], Meta(max_length=200)]


class TenantCreate(Struct, forbid_unknown_fields=True):
    name: Name
    description: Description = ""
    content_capture: bool = False
    allowed_models: Models | None = None  # None: every model the node serves


class WorkflowCreate(Struct, forbid_unknown_fields=True):
    tenant_id: Id
    name: Name
    description: Description = ""


class AgentCreate(Struct, forbid_unknown_fields=True):
    workflow_id: Id
    name: Name
    description: Description = ""


class Rename(Struct, forbid_unknown_fields=True):
    name: Name | None = None
    description: Description | None = None


class TenantUpdate(Rename, forbid_unknown_fields=True):
    content_capture: bool | None = None
    allowed_models: Models | msgspec.UnsetType | None = msgspec.UNSET  # null: every model again


class ApiKeyCreate(Struct, forbid_unknown_fields=True):
    workflow_id: Id
    agent_id: Id | None = None
    name: Annotated[str, Meta(max_length=100)] = ""
    scopes: Annotated[list[Scope], Meta(min_length=1)] = msgspec.field(default_factory=lambda: ["inference"])
    allowed_models: Models | None = None  # None: what its tenant may use
    expires_at: datetime | None = None


class ServiceClientCreate(Struct, forbid_unknown_fields=True):
    workflow_id: Id
    agent_id: Id | None = None
    roles: Annotated[list[Literal["user", "operator"]], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["user"]
    )


class LocalAccountUpdate(Struct, forbid_unknown_fields=True):
    roles: Annotated[list[Literal["admin", "operator", "auditor", "user"]], Meta(min_length=1)] | None = None
    disabled: bool | None = None

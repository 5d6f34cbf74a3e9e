"""Registry tables: model versions, every transition of their lifecycle, and what each served name points at."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

IMPORTED, APPROVED, DEPLOYED, RETIRED = "imported", "approved", "deployed", "retired"
STATES = (IMPORTED, APPROVED, DEPLOYED, RETIRED)


def _now() -> datetime:
    return datetime.now(UTC)


class ModelVersion(SQLModel, table=True):
    """One imported version of a served name: its files (sha256 and size), what its config says, how it is
    served, and where it stands in its lifecycle."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("served_name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    served_name: str = Field(max_length=64, index=True, description="what clients send as `model`")
    version: int = Field(ge=1, description="1, 2, ... per served name")
    source: str = Field(max_length=1000, description="the folder or GGUF file it was imported from")
    source_format: str = Field(max_length=8, description="hf | gguf")
    path: str = Field(max_length=1000, description="the version's own folder, which engines serve")
    runner: str = Field(default="generate", max_length=16, description="generate | pooling")
    engine_kind: str = Field(default="vllm", max_length=64)
    architecture: str = Field(max_length=128)
    context_length: int = Field(ge=1)
    dtype: str = Field(default="", max_length=32, description="torch_dtype of its config")
    param_count: int = Field(default=0, ge=0, description="parameters, counted from the safetensors headers")
    files: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False), description="[{path, sha256, size}]"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False), description="serving options (validated)"
    )
    state: str = Field(default=IMPORTED, max_length=16, index=True)
    files_removed: bool = False
    imported_by: str = Field(max_length=200)
    imported_at: datetime = Field(default_factory=_now)
    approved_by: str | None = Field(default=None, max_length=200)
    approved_at: datetime | None = None
    deployed_by: str | None = Field(default=None, max_length=200)
    deployed_at: datetime | None = None
    retired_by: str | None = Field(default=None, max_length=200)
    retired_at: datetime | None = None


class ModelTransition(SQLModel, table=True):
    """Who moved a version from one state to another, and when (deploys and rollbacks included)."""

    __tablename__ = "model_transitions"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="model_versions.id", index=True, ondelete="CASCADE")
    action: str = Field(max_length=16, description="import | approve | deploy | rollback | undeploy | retire | remove")
    from_state: str | None = Field(default=None, max_length=16)
    to_state: str = Field(max_length=16)
    actor: str = Field(max_length=200)
    at: datetime = Field(default_factory=_now)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class ServedModel(SQLModel, table=True):
    """What a served name points at now: its version and that version's engines (the gateways read this)."""

    __tablename__ = "served_models"

    served_name: str = Field(primary_key=True, max_length=64)
    version_id: int = Field(foreign_key="model_versions.id")
    previous_version_id: int | None = Field(default=None, foreign_key="model_versions.id")
    runner: str = Field(default="generate", max_length=16)
    engines: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False), description="[{name, url, pid, port}]"
    )
    switched_by: str = Field(max_length=200)
    switched_at: datetime = Field(default_factory=_now)

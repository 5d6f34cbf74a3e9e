"""Identity tables: tenants, workflows, agents, users (mirrored IdP subjects) and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from appliance.lib.ids import new_id
from appliance.lib.times import utcnow

ROLES = ("admin", "operator", "auditor", "user")
LOCAL_SUBJECT = "local:"  # the `sub` of a local account's tokens and console sessions: "local:<username>"


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"

    id: str = Field(default_factory=lambda: new_id("ten"), primary_key=True, max_length=32)
    name: str = Field(unique=True, index=True, max_length=100)
    description: str = Field(default="", max_length=1000)
    content_capture: bool = Field(default=False, description="keep /v1 prompt and answer text (redacted)")
    allowed_models: list[str] | None = Field(
        default=None, sa_column=Column(JSON, nullable=True), description="the models its callers may use (None: all)"
    )
    created_at: datetime = Field(default_factory=utcnow)


class Workflow(SQLModel, table=True):
    __tablename__ = "workflows"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: str = Field(default_factory=lambda: new_id("wf"), primary_key=True, max_length=32)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=32, ondelete="CASCADE")
    name: str = Field(max_length=100)
    description: str = Field(default="", max_length=1000)
    created_at: datetime = Field(default_factory=utcnow)


class Agent(SQLModel, table=True):
    __tablename__ = "agents"
    __table_args__ = (UniqueConstraint("workflow_id", "name"),)

    id: str = Field(default_factory=lambda: new_id("agt"), primary_key=True, max_length=32)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=32, ondelete="CASCADE")
    workflow_id: str = Field(foreign_key="workflows.id", index=True, max_length=32, ondelete="CASCADE")
    name: str = Field(max_length=100)
    description: str = Field(default="", max_length=1000)
    created_at: datetime = Field(default_factory=utcnow)


class User(SQLModel, table=True):
    """An identity provider's subject, mirrored the first time the appliance sees it."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("issuer", "subject"),)

    id: str = Field(default_factory=lambda: new_id("usr"), primary_key=True, max_length=32)
    issuer: str = Field(max_length=300)
    subject: str = Field(max_length=300)
    username: str = Field(default="", max_length=300)
    tenant_id: str | None = Field(default=None, index=True, max_length=32)
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, description="first seen")
    last_seen_at: datetime = Field(default_factory=utcnow)


class ApiKey(SQLModel, table=True):
    """An appliance API key. The secret is never stored: only its keyed hash (HMAC-SHA256)."""

    __tablename__ = "api_keys"

    id: str = Field(default_factory=lambda: new_id("key"), primary_key=True, max_length=32)
    name: str = Field(default="", max_length=100)
    secret_hash: str = Field(max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=32, ondelete="CASCADE")
    workflow_id: str = Field(foreign_key="workflows.id", index=True, max_length=32, ondelete="CASCADE")
    agent_id: str | None = Field(default=None, foreign_key="agents.id", max_length=32, ondelete="CASCADE")
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    allowed_models: list[str] | None = Field(
        default=None, sa_column=Column(JSON, nullable=True), description="the models it may use (None: its tenant's)"
    )
    expires_at: datetime | None = None
    created_by: str = Field(max_length=300)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class LocalAccount(SQLModel, table=True):
    """A person who signs in to the embedded issuer (Keycloak holds people on an installed node)."""

    __tablename__ = "local_accounts"

    username: str = Field(primary_key=True, max_length=100)
    password_hash: str = Field(max_length=300, description="argon2id")
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tenant_id: str | None = Field(default=None, foreign_key="tenants.id", max_length=32, ondelete="CASCADE")
    must_change_password: bool = False
    disabled: bool = Field(default=False, description="refused at sign-in; its console sessions end")
    created_at: datetime = Field(default_factory=utcnow)


class ServiceClient(SQLModel, table=True):
    """An OAuth client that gets tokens with client_credentials (a workflow's service account)."""

    __tablename__ = "service_clients"

    id: str = Field(default_factory=lambda: new_id("cli"), primary_key=True, max_length=32)
    secret_hash: str = Field(max_length=64)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=32, ondelete="CASCADE")
    workflow_id: str = Field(foreign_key="workflows.id", max_length=32, ondelete="CASCADE")
    agent_id: str | None = Field(default=None, foreign_key="agents.id", max_length=32, ondelete="CASCADE")
    roles: list[str] = Field(default_factory=lambda: ["user"], sa_column=Column(JSON, nullable=False))
    created_by: str = Field(max_length=300)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class AuthorizationCode(SQLModel, table=True):
    """A one-time code of the authorization-code flow, bound to its PKCE challenge and redirect URI."""

    __tablename__ = "authorization_codes"

    code_hash: str = Field(primary_key=True, max_length=64)
    client_id: str = Field(max_length=100)
    redirect_uri: str = Field(max_length=500)
    code_challenge: str = Field(max_length=128)
    username: str = Field(max_length=100)
    expires_at: datetime


class ConsoleSession(SQLModel, table=True):
    """A signed-in console user. The cookie holds a random id; the table holds only its hash."""

    __tablename__ = "console_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    subject: str = Field(max_length=300)
    username: str = Field(default="", max_length=300)
    roles: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tenant_id: str | None = Field(default=None, max_length=32)
    user_id: str | None = Field(default=None, max_length=32)
    csrf_token: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime

"""Which tenant (and key) created each stored response of the Responses API: the engines keep the responses, the
gateway keeps who may read or continue them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class StoredResponse(SQLModel, table=True):
    __tablename__ = "stored_responses"

    response_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str | None = Field(default=None, index=True, max_length=64)
    api_key_id: str | None = Field(default=None, max_length=64)
    subject: str | None = Field(default=None, max_length=300)
    model: str = Field(max_length=128)
    engine_url: str = Field(max_length=200, description="the engine that keeps it (in its memory)")
    request_id: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=_now)

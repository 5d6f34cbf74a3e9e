"""Ledger tables: one usage row per gateway request."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column
from sqlmodel import Field, SQLModel

from appliance.lib.times import utcnow


class UsageRecord(SQLModel, table=True):
    __tablename__ = "usage_records"

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(index=True, unique=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    model: str = Field(index=True, max_length=128)
    endpoint: str = Field(max_length=64)
    engine: str | None = Field(default=None, max_length=200, description="the engine that served it (routing)")
    tenant_id: str | None = Field(default=None, index=True, max_length=32)
    workflow_id: str | None = Field(default=None, max_length=32)
    agent_id: str | None = Field(default=None, max_length=32)
    api_key_id: str | None = Field(default=None, max_length=32)
    subject: str | None = Field(default=None, max_length=300, description="token `sub` or API key id")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    ttft_ms: float | None = Field(default=None, description="time to first token (streamed requests)")
    latency_ms: float = 0.0
    status_code: int = Field(index=True)
    error_code: str | None = Field(default=None, max_length=64)
    budget_id: str | None = Field(default=None, max_length=32, description="the budget that refused the request")
    cost_micros: int = Field(
        default=0,
        sa_column=Column(BigInteger, nullable=False, server_default="0"),
        description="millionths of currency",
    )
    retry_attempt: int = Field(default=0, description="0: first try of its logical call")
    depth: int = Field(default=0, description="position in an agent's chain of calls (0: not a sub-call)")
    streamed: bool = False
    client_disconnected: bool = False
    embed_ms: float | None = Field(default=None, description="retrieval: embedding the query")
    search_ms: float | None = Field(default=None, description="retrieval: the vector search")
    chunks_injected: int = Field(default=0, description="retrieval: chunks put into the prompt")
    injected_tokens: int = Field(default=0, description="retrieval: prompt tokens those chunks added")
    retrieval_cached: bool = Field(default=False, description="retrieval: served from the cache")
    finish_reason: str | None = Field(
        default=None, max_length=32, description="why generation ended: `length` if any choice was cut off"
    )
    context_length: int | None = Field(
        default=None, description="the serving engine's context length (max_model_len), where the gateway knew it"
    )

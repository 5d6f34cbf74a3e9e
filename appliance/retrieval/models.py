"""Retrieval tables: a tenant's collections and the documents ingested into them (their chunks live in Qdrant)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from appliance.lib.ids import new_id
from appliance.lib.times import utcnow


class RagCollection(SQLModel, table=True):
    __tablename__ = "rag_collections"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: str = Field(default_factory=lambda: new_id("col"), primary_key=True, max_length=32)
    tenant_id: str = Field(foreign_key="tenants.id", index=True, max_length=32, ondelete="CASCADE")
    name: str = Field(max_length=100)
    description: str = Field(default="", max_length=1000)
    embedding_model: str = Field(max_length=128)
    dimensions: int
    version: int = Field(default=0, description="bumped by every change of its content: retrieval cache key")
    created_at: datetime = Field(default_factory=utcnow)


class RagDocument(SQLModel, table=True):
    __tablename__ = "rag_documents"
    __table_args__ = (UniqueConstraint("collection_id", "content_hash"),)

    id: str = Field(default_factory=lambda: new_id("doc"), primary_key=True, max_length=32)
    collection_id: str = Field(foreign_key="rag_collections.id", index=True, max_length=32, ondelete="CASCADE")
    tenant_id: str = Field(index=True, max_length=32)
    name: str = Field(max_length=300)
    media_type: str = Field(max_length=64)
    content_hash: str = Field(max_length=64, description="sha256 of the uploaded bytes")
    size_bytes: int
    status: str = Field(default="ingesting", max_length=16, description="ingesting | ready")
    chunks: int = 0
    chunks_done: int = 0
    tokens: int = Field(default=0, description="tokens of its text (embedding tokenizer)")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)

"""Audit tables: an append-only hash chain of records, its head, the Merkle tree over them, and signed
checkpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, LargeBinary, SmallInteger
from sqlmodel import Field, SQLModel


class AuditRecord(SQLModel, table=True):
    """One event (NIST SP 800-53 AU-3 content: what, when, where, source, outcome, who, on what)."""

    __tablename__ = "audit_records"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    ts: datetime = Field(index=True, description="UTC")
    node: str = Field(max_length=200)
    component: str = Field(max_length=50)
    event_type: str = Field(index=True, max_length=100)
    outcome: str = Field(index=True, max_length=20, description="success | failure | denied")
    subject: str | None = Field(default=None, index=True, max_length=300)
    subject_kind: str | None = Field(default=None, max_length=20)
    tenant_id: str | None = Field(default=None, index=True, max_length=32)
    object_type: str | None = Field(default=None, max_length=50)
    object_id: str | None = Field(default=None, max_length=300)
    source_ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=300)
    request_id: str | None = Field(default=None, index=True, max_length=64)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class AuditHead(SQLModel, table=True):
    """The chain's head, updated in the same transaction as every append (one row, id 1)."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    hash: str = Field(default="0" * 64, max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    __tablename__ = "audit_checkpoints"

    id: int | None = Field(default=None, primary_key=True)
    tree_size: int = Field(sa_column=Column(BigInteger, nullable=False, index=True))
    head_hash: str = Field(max_length=64, description="the chain's hash of record `tree_size`")
    root_hash: str | None = Field(default=None, max_length=64, description="Merkle root (None: a legacy checkpoint)")
    created_at: datetime
    note: str = Field(description="signed note: origin, tree size, Merkle root; Ed25519 signature")
    anchor: bool = Field(default=False, description="anchors the records pruned before it")


class AuditTreeNode(SQLModel, table=True):
    """A complete subtree of the RFC 6962 Merkle tree over the records: leaves [idx << level, (idx+1) << level).
    Level 0 holds the leaf hashes; they stay when their records are pruned, so proofs still reach them."""

    __tablename__ = "audit_tree_nodes"

    level: int = Field(sa_column=Column(SmallInteger, primary_key=True, autoincrement=False))
    idx: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class AuditTree(SQLModel, table=True):
    """How many records the tree holds (one row, id 1; locked while the tree grows)."""

    __tablename__ = "audit_tree"

    id: int = Field(default=1, primary_key=True)
    size: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class AuditContent(SQLModel, table=True):
    """Prompt and answer text of a /v1 request, kept only for tenants that enabled content capture,
    apart from the chain (so it can be purged without breaking it) and with secrets redacted."""

    __tablename__ = "audit_content"

    request_id: str = Field(primary_key=True, max_length=64)
    tenant_id: str | None = Field(default=None, index=True, max_length=32)
    created_at: datetime
    prompt: str = ""
    answer: str = ""
    redactions: int = 0

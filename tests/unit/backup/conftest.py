"""A node's data for the backup tests: real SQLite or PostgreSQL, a real API key, a real audit chain, a real
Qdrant local-mode collection."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent
from appliance.db.engine import create_schema, make_engine
from appliance.identity import service
from appliance.identity.apikeys import ApiKeyAuthenticator
from appliance.identity.schemas import ApiKeyCreate, TenantCreate, WorkflowCreate
from appliance.identity.setup import key_hasher
from appliance.lib.principal import Principal
from appliance.retrieval.setup import qdrant_local_path
from appliance.retrieval.vectors import VectorStore, point_id
from appliance.settings import Settings

PASSPHRASE = b"correct horse battery staple"
ADMIN = Principal(kind="token", subject="test", roles=frozenset({"admin"}))


@pytest.fixture(autouse=True)
def _no_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No appliance.toml of the developer's machine leaks in; tests that want one set APPLIANCE_CONFIG."""
    monkeypatch.setenv("APPLIANCE_CONFIG", str(tmp_path / "no-config.toml"))


def unit(index: int, dims: int = 8) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(dims)]


@dataclass
class NodeData:
    settings: Settings
    api_key: str
    audit_records: int


def populate(settings: Settings, *, tenant: str = "acme", records: int = 5) -> NodeData:
    """What an admin's first hour leaves: an API key, audit records with a signed checkpoint, a collection."""
    engine = make_engine(settings.database_url)
    create_schema(engine)
    with Session(engine) as session:
        tenant_id = service.create_tenant(session, ADMIN, TenantCreate(name=tenant))["id"]
        workflow_id = service.create_workflow(session, ADMIN, WorkflowCreate(tenant_id=tenant_id, name="wf"))["id"]
        _record, key = service.create_api_key(
            session, ADMIN, key_hasher(settings), ApiKeyCreate(workflow_id=workflow_id, scopes=["inference"])
        )
    engine.dispose()
    store = audit_store(settings)
    store.append([AuditEvent("admin.keys.create", "success", subject=tenant, detail={"n": n}) for n in range(records)])
    store.checkpoint()
    return NodeData(settings, key, records)


async def add_collection(settings: Settings, name: str = "docs") -> None:
    path = qdrant_local_path(settings)
    assert path is not None
    store = VectorStore(path=path)
    await store.create(name, 8)
    await store.upsert(
        name,
        [point_id("doc", i) for i in range(3)],
        [unit(0), unit(1), unit(2)],
        [{"document_id": "doc", "chunk_index": i} for i in range(3)],
    )
    store.close()


async def key_tenant(settings: Settings, key: str) -> str | None:
    """The tenant the key authenticates as on ``settings``' node, with the real authenticator."""
    engine = make_engine(settings.database_url)
    try:
        principal = await ApiKeyAuthenticator(engine, key_hasher(settings)).authenticate(key)
    finally:
        engine.dispose()
    return principal.tenant_id


def tenant_names(settings: Settings) -> list[str]:
    from appliance.identity.models import Tenant

    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        names = sorted(t.name for t in session.exec(select(Tenant)).all())
    engine.dispose()
    return names


def disk_state(*roots: Path) -> dict[str, Any]:
    """Every path under ``roots``: a file's sha256 and mode, a folder's mode (what "nothing changed" means)."""
    state: dict[str, Any] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                path = Path(folder) / name
                state[str(path)] = ("dir", path.stat().st_mode)
            for name in files:
                path = Path(folder) / name
                state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return state

"""Building the audit domain's parts from settings (used by the app factory and the CLI)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import Engine

from appliance.audit.chain import NoteKey
from appliance.audit.store import AuditStore
from appliance.audit.witness import CosignedCheckpoints
from appliance.db.engine import create_schema, make_engine
from appliance.settings import Settings


def audit_dir(settings: Settings) -> Path:
    """The audit files outside the database: the public key, and the latest checkpoint (which shows a rollback
    of the database)."""
    return settings.data_dir / "audit"


def audit_store(settings: Settings) -> AuditStore:
    """The store, with its own engine: appends hold the write lock for their whole transaction."""
    return _store(settings, make_engine(settings.database_url, serialized_writes=True))


@contextmanager
def audit_store_for_once(settings: Settings) -> Iterator[AuditStore]:
    """A store for one piece of work (a CLI command, a model transition, the supervisor's start and stop): its
    database engine and connections are closed when the work is done."""
    engine = make_engine(settings.database_url, serialized_writes=True)
    try:
        yield _store(settings, engine)
    finally:
        engine.dispose()


def _store(settings: Settings, engine: Engine) -> AuditStore:
    create_schema(engine)
    node = re.sub(r"[\s+]", "-", settings.audit.node or socket.gethostname())  # a log's name has neither
    origin = settings.audit.origin or f"{node}/audit"
    key = NoteKey.load_or_create(settings.secrets_dir / "audit-signing-key", origin)
    public = audit_dir(settings) / "audit-public-key.pem"
    if not public.exists():
        public.parent.mkdir(parents=True, exist_ok=True)
        public.write_bytes(key.public_pem())
    return AuditStore(
        engine,
        key,
        latest_checkpoint_file=audit_dir(settings) / "latest-checkpoint",
        checkpoint_every=settings.audit.checkpoint_every,
        checkpoint_interval_s=settings.audit.checkpoint_interval_s,
        node=settings.audit.node,
        legacy_key_name=settings.audit.node or "appliance",  # checkpoints signed before the Merkle tree
    )


def cosigned_checkpoints(settings: Settings, store: AuditStore) -> CosignedCheckpoints:
    """The witnesses' co-signed checkpoints, kept beside the audit key (``<data_dir>/audit/cosigned``)."""
    return CosignedCheckpoints(store, audit_dir(settings) / "cosigned", settings.audit.witnesses)

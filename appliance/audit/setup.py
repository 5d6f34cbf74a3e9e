"""Building the audit domain's parts from settings (used by the app factory and the CLI)."""

from __future__ import annotations

from appliance.audit.chain import NoteKey
from appliance.audit.store import AuditStore
from appliance.db.engine import create_schema, make_engine
from appliance.settings import Settings


def audit_store(settings: Settings) -> AuditStore:
    """The store, with its own engine: appends hold the write lock for their whole transaction."""
    engine = make_engine(settings.database_url, serialized_writes=True)
    create_schema(engine)
    key = NoteKey.load_or_create(settings.secrets_dir / "audit-signing-key", settings.audit.node or "appliance")
    public = settings.data_dir / "audit" / "audit-public-key.pem"
    if not public.exists():
        public.parent.mkdir(parents=True, exist_ok=True)
        public.write_bytes(key.public_pem())
    return AuditStore(
        engine,
        key,
        latest_checkpoint_file=settings.data_dir / "audit" / "latest-checkpoint",
        checkpoint_every=settings.audit.checkpoint_every,
        checkpoint_interval_s=settings.audit.checkpoint_interval_s,
        node=settings.audit.node,
    )

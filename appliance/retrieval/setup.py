"""Building the retrieval service from the settings (called by the app factory, never at import)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from appliance.audit.writer import AuditWriter
from appliance.budgets.enforce import BudgetEnforcer
from appliance.engines.manifest import MANIFEST_FILE, ModelIntegrityError, load_manifest
from appliance.gateway.serving import OpenAIServing
from appliance.gateway.upstream import EngineRouter
from appliance.ledger.writer import UsageWriter
from appliance.retrieval.catalog import Catalog
from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.edge_shared import SharedEdgeStore
from appliance.retrieval.metering import CachedAnswers
from appliance.retrieval.service import Retrieval
from appliance.retrieval.vectors import Store, VectorStore
from appliance.settings import Settings

log = logging.getLogger(__name__)


def qdrant_local_path(settings: Settings) -> Path | None:
    """The embedded store's folder (local mode's collections, Qdrant Edge's shards under ``edge/``, one
    ``.lock``), or None when a Qdrant server holds the vectors."""
    retrieval = settings.retrieval
    return None if retrieval.backend == "server" else retrieval.qdrant_path or settings.data_dir / "qdrant"


def vector_store(settings: Settings) -> Store:
    """The store ``retrieval.backend`` names: Qdrant Edge in process (default; shared with the node's other
    gateway processes unless ``retrieval.shared`` is off), a Qdrant server, or local mode."""
    retrieval = settings.retrieval
    if retrieval.backend == "server":
        key = retrieval.qdrant_api_key.get_secret_value() if retrieval.qdrant_api_key else None
        return VectorStore(url=retrieval.qdrant_url, api_key=key)
    path = qdrant_local_path(settings)
    assert path is not None
    if retrieval.backend == "edge":
        options: dict[str, Any] = {
            "hybrid": retrieval.hybrid,
            "optimize_after": retrieval.optimize_after,
            "hnsw_ef": retrieval.hnsw_ef,
            "hnsw_m": retrieval.hnsw_m,
            "hnsw_ef_construct": retrieval.hnsw_ef_construct,
        }
        return SharedEdgeStore(path, **options) if retrieval.shared else EdgeStore(path, **options)
    return VectorStore(path=path)


def retrieval_service(
    settings: Settings,
    db_engine: Engine,
    serving: OpenAIServing,
    router: EngineRouter,
    *,
    usage: UsageWriter,
    audit: AuditWriter | None,
    budgets: BudgetEnforcer | None,
) -> Retrieval:
    """Retrieval, whose engine calls go through ``serving``; its cached answers are metered with the same
    usage ledger, audit log and budgets."""
    model = settings.retrieval.embedding_model
    try:
        dimensions = load_manifest(settings.models_dir / model / MANIFEST_FILE).dimensions
    except ModelIntegrityError as exc:
        log.warning("retrieval: the embedding model's manifest cannot be read (%s); collections cannot be made", exc)
        dimensions = None
    return Retrieval(
        settings.retrieval,
        Catalog(db_engine),
        vector_store(settings),
        serving,
        router,
        cached_answers=CachedAnswers(usage, audit, budgets),
        tokenizer_dir=settings.prepared_models_dir / model,
        dimensions=dimensions,
    )

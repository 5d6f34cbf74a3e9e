"""``appliance retrieval migrate``: copy the collections of qdrant-client's local mode into Qdrant Edge shards
in the same folder (``<folder>/collection/…`` to ``<folder>/edge/…``), with the same point ids, vectors and
payloads (the BM25 vectors are computed from each chunk's text), then build their indexes.

It runs with the appliance stopped: it holds local mode's lock on the folder for the whole copy. Copying again
is harmless (the same ids are overwritten); a copy is checked by counting the points on both sides, and only
then, with ``remove_local``, are the local-mode collections deleted.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from qdrant_client import QdrantClient, models

from appliance.retrieval.edge import EdgeStore

log = logging.getLogger(__name__)


def _dimensions(client: QdrantClient, name: str) -> int:
    vectors = client.get_collection(name).config.params.vectors
    if not isinstance(vectors, models.VectorParams):
        raise ValueError(f"collection {name} has named vectors; the appliance makes one unnamed vector")
    return int(vectors.size)


def _dense(vector: Any, name: str) -> list[float]:
    if not isinstance(vector, list):
        raise ValueError(f"collection {name} has a point without its one dense vector")
    return [float(x) for x in vector]


async def _copy(client: QdrantClient, store: EdgeStore, name: str, batch: int) -> int:
    await store.create(name, _dimensions(client, name))
    offset: Any = None
    copied = 0
    while True:
        points, offset = client.scroll(name, limit=batch, offset=offset, with_payload=True, with_vectors=True)
        if points:
            ids = [str(point.id) for point in points]
            vectors = [_dense(point.vector, name) for point in points]
            payloads = [dict(point.payload or {}) for point in points]
            await store.upsert(name, ids, vectors, payloads)
            copied += len(points)
        if offset is None:
            return copied


def migrate(folder: Path, *, remove_local: bool = False, batch: int = 512) -> dict[str, dict[str, Any]]:
    """Copy every local-mode collection of ``folder`` into Qdrant Edge; per collection: points copied, index
    build (seconds, peak memory), whether the local copy was removed."""
    client = QdrantClient(path=str(folder))  # local mode's lock: the appliance must be stopped
    store = EdgeStore(folder, lock=False, optimize_after=1 << 62)  # that lock covers the folder
    report: dict[str, dict[str, Any]] = {}
    try:
        for collection in client.get_collections().collections:
            name = collection.name
            copied = asyncio.run(_copy(client, store, name, batch))
            local = int(client.count(name, exact=True).count)
            edge = asyncio.run(store.count(name))
            if edge != local:
                raise RuntimeError(f"collection {name}: {local} points in local mode, {edge} in Qdrant Edge")
            build = store.build(name)
            if remove_local:
                client.delete_collection(name)
            report[name] = {"points": copied, "build": build, "local_removed": remove_local}
            log.info("migrated %s: %d points", name, copied)
    finally:
        store.close()
        client.close()
    return report

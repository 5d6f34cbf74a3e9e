"""The vector store's interface (:class:`Store`), and its ``qdrant-client`` implementation: one code path for a
Qdrant server (URL, API key, TLS; production) and the embedded local mode (a folder on disk; the default before
Qdrant Edge, kept selectable for the migration). The embedded default is :class:`appliance.retrieval.edge.EdgeStore`.

Each appliance collection is one Qdrant collection, named after its id; which tenant may reach it is decided
by the database row, before this module is asked anything. The client is opened on first use (local mode
locks its folder, so a process that never retrieves never takes the lock). Calls run in worker threads;
local mode is not thread-safe, so they are serialised there.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from qdrant_client import QdrantClient, models

from appliance.lib.errors import ServiceUnavailableError

T = TypeVar("T")
_POINT_NAMESPACE = uuid.UUID("6f1c2d7e-54a3-4c55-9a77-3b1e0f0c9d21")


@dataclass(frozen=True, slots=True)
class Hit:
    point_id: str
    score: float
    payload: dict[str, Any]


class Store(Protocol):
    """What retrieval asks of a vector store. ``name`` is a collection's Qdrant name (:func:`qdrant_name`); the
    tenant that may reach it was decided by the catalog before any call."""

    @property
    def where(self) -> str: ...

    def close(self) -> None: ...

    async def create(self, name: str, dimensions: int) -> None: ...

    async def drop(self, name: str) -> None: ...

    async def upsert(
        self, name: str, ids: Sequence[str], vectors: Sequence[list[float]], payloads: Sequence[dict[str, Any]]
    ) -> None: ...

    async def search(self, name: str, vector: list[float], limit: int, text: str | None = None) -> list[Hit]:
        """The nearest chunks; a store that can also match ``text`` (BM25) fuses both."""
        ...

    async def delete_document(self, name: str, document_id: str) -> None: ...

    async def count(self, name: str, document_id: str | None = None) -> int: ...


def point_id(document_id: str, index: int) -> str:
    """A chunk's point id: the same for the same document and position, so a retried write overwrites."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{document_id}:{index}"))


def qdrant_name(collection_id: str) -> str:
    return f"appliance_{collection_id}"


def _document_filter(document_id: str) -> models.Filter:
    return models.Filter(must=[models.FieldCondition(key="document_id", match=models.MatchValue(value=document_id))])


class VectorStore:
    def __init__(self, *, path: Path | None = None, url: str | None = None, api_key: str | None = None) -> None:
        if (path is None) == (url is None):
            raise ValueError("give the vector store a local path or a server URL")
        self._path, self._url, self._api_key = path, url, api_key
        self._client: QdrantClient | None = None
        self._open_lock = threading.Lock()
        self._local_lock = threading.Lock() if path is not None else None

    @property
    def where(self) -> str:
        return str(self._path) if self._path is not None else str(self._url)

    def _open(self) -> QdrantClient:
        with self._open_lock:
            if self._client is None:
                try:
                    if self._path is not None:
                        self._path.mkdir(parents=True, exist_ok=True)
                        self._client = QdrantClient(path=str(self._path))
                    else:
                        self._client = QdrantClient(url=self._url, api_key=self._api_key, timeout=30)
                except Exception as exc:
                    raise ServiceUnavailableError(
                        f"The vector store at {self.where} cannot be opened: {exc}", code="retrieval_unavailable"
                    ) from exc
            return self._client

    def _call(self, work: Callable[[QdrantClient], T]) -> T:
        client = self._open()
        try:
            if self._local_lock is None:
                return work(client)
            with self._local_lock:
                return work(client)
        except ServiceUnavailableError:
            raise
        except Exception as exc:
            raise ServiceUnavailableError(
                f"The vector store failed: {type(exc).__name__}: {exc}", code="retrieval_unavailable"
            ) from exc

    async def _run(self, work: Callable[[QdrantClient], T]) -> T:
        return await asyncio.to_thread(self._call, work)

    def close(self) -> None:
        with self._open_lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    async def create(self, name: str, dimensions: int) -> None:
        def work(client: QdrantClient) -> None:
            if not client.collection_exists(name):
                client.create_collection(
                    name, vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.COSINE)
                )

        await self._run(work)

    async def drop(self, name: str) -> None:
        def work(client: QdrantClient) -> None:
            if client.collection_exists(name):
                client.delete_collection(name)

        await self._run(work)

    async def upsert(
        self, name: str, ids: Sequence[str], vectors: Sequence[list[float]], payloads: Sequence[dict[str, Any]]
    ) -> None:
        points = [
            models.PointStruct(id=pid, vector=vector, payload=payload)
            for pid, vector, payload in zip(ids, vectors, payloads, strict=True)
        ]
        await self._run(lambda client: client.upsert(name, points=points, wait=True))

    async def search(self, name: str, vector: list[float], limit: int, text: str | None = None) -> list[Hit]:
        """Dense only: collections made by this client have no sparse vectors, so ``text`` is not used."""

        def work(client: QdrantClient) -> list[Hit]:
            if not client.collection_exists(name):
                return []
            found = client.query_points(name, query=vector, limit=limit, with_payload=True).points
            return [Hit(str(point.id), float(point.score), dict(point.payload or {})) for point in found]

        return await self._run(work)

    async def delete_document(self, name: str, document_id: str) -> None:
        def work(client: QdrantClient) -> None:
            if client.collection_exists(name):
                client.delete(name, points_selector=models.FilterSelector(filter=_document_filter(document_id)))

        await self._run(work)

    async def count(self, name: str, document_id: str | None = None) -> int:
        def work(client: QdrantClient) -> int:
            if not client.collection_exists(name):
                return 0
            selector = _document_filter(document_id) if document_id is not None else None
            return int(client.count(name, count_filter=selector, exact=True).count)

        return await self._run(work)

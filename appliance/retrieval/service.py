"""Retrieval next to the model: ingestion (extract, chunk, embed, store), search, and grounded chat.

Every engine call goes through the gateway's own serving path, so ingestion, queries and grounded answers
are authorised, budgeted, admitted, priced, metered and audited like any /v1 request. A grounded chat's usage
row carries what retrieval cost it: embedding and search time, and the chunks and tokens it injected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from appliance.budgets.store import CallLink
from appliance.gateway.protocol import ChatCompletionRequest, EmbeddingRequest, decode_json_object
from appliance.gateway.serving import Endpoint, JSONResult, OpenAIServing
from appliance.gateway.settlement import Source
from appliance.gateway.streaming import StreamRelay
from appliance.gateway.upstream import EngineRouter
from appliance.gateway.usage import sse
from appliance.ledger.writer import RetrievalStats
from appliance.lib.errors import InvalidRequestError, PayloadTooLargeError, RateLimitedError
from appliance.lib.principal import Principal
from appliance.lib.work import WorkPool
from appliance.retrieval.cache import RetrievalCache
from appliance.retrieval.catalog import Catalog, document_view
from appliance.retrieval.chunking import Chunk
from appliance.retrieval.documents import Chunking, DocumentProcess
from appliance.retrieval.embeddings import embeddings_of, embeddings_request
from appliance.retrieval.extract import ExtractionLimits
from appliance.retrieval.metering import CachedAnswers
from appliance.retrieval.models import RagCollection, RagDocument
from appliance.retrieval.vectors import Store, point_id, qdrant_name
from appliance.settings import RetrievalSettings

log = logging.getLogger(__name__)

# The appliance's own embedding model: model allowlists govern the models clients name, not this one.
INGEST = Endpoint("/v1/rag/documents", EmbeddingRequest, "pooling", engine_path="/v1/embeddings", client_model=False)
QUERY = Endpoint("/v1/rag/query", EmbeddingRequest, "pooling", engine_path="/v1/embeddings", client_model=False)
CHAT = Endpoint("/v1/rag/chat", ChatCompletionRequest, "generate", engine_path="/v1/chat/completions")

GROUNDING = (
    "Answer the question using only the numbered sources below. Cite the sources you use by their number in "
    "square brackets, like [1]. If the sources do not contain the answer, say that you do not know.\n\nSources:\n"
)


@dataclass(frozen=True, slots=True)
class Passage:
    document_id: str
    document_name: str
    chunk_index: int
    text: str
    score: float
    tokens: int

    def view(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "document_name": self.document_name,
            "chunk_index": self.chunk_index,
            "score": round(self.score, 6),
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class Found:
    passages: list[Passage]
    query_tokens: int
    embed_ms: float
    search_ms: float
    cached: bool


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, and what the gateway knows of the request (its id names the engine calls it makes)."""

    principal: Principal
    request_id: str
    source: Source
    link: CallLink

    def sub(self, suffix: str) -> Caller:
        """The same caller, for one more engine call of this request (its own usage row)."""
        return Caller(self.principal, f"{self.request_id}.{suffix}", self.source, self.link)


@dataclass(frozen=True, slots=True)
class Upload:
    raw: bytes
    name: str
    media_type: str


class Retrieval:
    def __init__(
        self,
        settings: RetrievalSettings,
        catalog: Catalog,
        store: Store,
        serving: OpenAIServing,
        router: EngineRouter,
        *,
        cached_answers: CachedAnswers,
        tokenizer_dir: Path,
        dimensions: int | None,
        extraction: WorkPool | None = None,
    ) -> None:
        self._settings = settings
        # Text extraction and chunking on a pool of their own (each job waiting on the document process): a few
        # large documents cannot take the threads database work (every request's) runs on; more uploads than it
        # holds are refused (429).
        self._extraction = extraction or WorkPool(
            "document-extraction",
            workers=1,
            queue=4,
            busy="Too many documents are being ingested at this moment; try again shortly.",
            retry_after_s=5,
        )
        # Documents being ingested, per tenant (this process): one tenant's flood of uploads is held to its share.
        self._ingesting: Counter[str] = Counter()
        self._cached_answers = cached_answers
        self._catalog = catalog
        self._store = store
        self._serving = serving
        self._router = router
        self._dimensions = dimensions
        self._documents = DocumentProcess(timeout_s=settings.extraction_timeout_s)
        self._chunking = Chunking(tokenizer_dir, settings.chunk_tokens, settings.chunk_overlap)
        self.cache: RetrievalCache[Found] = RetrievalCache(settings.cache_entries, settings.cache_ttl_s)

    def close(self) -> None:
        self._extraction.close()
        self._documents.close()
        self._store.close()

    # collections

    async def create_collection(
        self, principal: Principal, *, tenant_id: str | None, name: str, description: str
    ) -> dict[str, Any]:
        principal.require_tenant_data(write=True)
        model = self._settings.embedding_model
        self._router.route(model)  # the embedding model must be served here
        dims = self._dimensions
        if dims is None:
            raise InvalidRequestError(f"The embedding model `{model}` does not declare its dimensions.")
        view = await asyncio.to_thread(
            self._catalog.create_collection,
            principal,
            tenant_id=tenant_id,
            name=name,
            description=description,
            model=model,
            dims=dims,
        )
        await self._store.create(qdrant_name(view["id"]), dims)
        return view

    async def collection(
        self, principal: Principal, collection_id: str, *, write: bool = False, content: bool = False
    ) -> RagCollection:
        """A collection the principal may use: to change it (``write``), or to read what its documents say
        (``content``: queries and grounded answers); another tenant's answers 404."""
        principal.require_tenant_data(write=write, content=content)
        return await asyncio.to_thread(self._catalog.collection, principal, collection_id)

    async def list_collections(self, principal: Principal, tenant_id: str | None) -> dict[str, Any]:
        principal.require_tenant_data()
        return await asyncio.to_thread(self._catalog.list_collections, principal, tenant_id)

    async def view(self, principal: Principal, collection_id: str) -> dict[str, Any]:
        """The collection with its counts: documents and chunks (database) and points (the vector store)."""
        collection = await self.collection(principal, collection_id)
        view = await asyncio.to_thread(self._catalog.view, collection)
        return dict(view, points=await self._store.count(qdrant_name(collection.id)))

    async def documents(self, principal: Principal, collection_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._catalog.documents, await self.collection(principal, collection_id))

    async def document(self, principal: Principal, collection_id: str, document_id: str) -> dict[str, Any]:
        collection = await self.collection(principal, collection_id)
        return document_view(await asyncio.to_thread(self._catalog.document, collection, document_id))

    async def delete_collection(self, principal: Principal, collection_id: str) -> None:
        collection = await self.collection(principal, collection_id, write=True)
        await self._store.drop(qdrant_name(collection.id))  # the points first: nothing is left unreachable
        await asyncio.to_thread(self._catalog.delete_collection, collection)
        self.cache.forget(collection.id)

    async def forget_tenant(self, tenant_id: str) -> int:
        """Delete every collection of a tenant that is being deleted: its points (the files on disk in local
        mode), then its catalog rows; the number of collections."""
        ids = await asyncio.to_thread(self._catalog.tenant_collection_ids, tenant_id)
        for collection_id in ids:
            await self._store.drop(qdrant_name(collection_id))
            self.cache.forget(collection_id)
        await asyncio.to_thread(self._catalog.delete_tenant_collections, tenant_id)
        return len(ids)

    # documents

    def check_ingestion_room(self, tenant_id: str) -> None:
        """Refuse (429 ``too_many_ingestions``) when the tenant's ingestion slots are all taken: the route asks
        before anything else, even looking the collection up. The refusal closes the connection: the document
        it carries is not read."""
        most = self._settings.max_ingestions_per_tenant
        if self._ingesting[tenant_id] >= most:
            raise RateLimitedError(
                f"This tenant already has {most} documents being ingested; try again when one is done.",
                retry_after=5,
                code="too_many_ingestions",
                headers={"Connection": "close"},
                paced=True,
            )

    @contextmanager
    def ingestion_slot(self, tenant_id: str) -> Iterator[None]:
        """One of the tenant's ``max_ingestions_per_tenant`` slots for a document being ingested, taken before
        its body is read (a flood is refused cheaply: 429 ``too_many_ingestions``) and held until it is done."""
        self.check_ingestion_room(tenant_id)
        self._ingesting[tenant_id] += 1
        try:
            yield
        finally:
            self._ingesting[tenant_id] -= 1
            if not self._ingesting[tenant_id]:
                del self._ingesting[tenant_id]

    async def ingest(self, caller: Caller, collection: RagCollection, upload: Upload) -> tuple[dict[str, Any], bool]:
        """Ingest a document into a collection the caller may change (:meth:`collection` with ``write``);
        ``(document, created)``.
        The same bytes again add nothing. A failure part-way (engine, budget, vector store, the client hanging
        up) removes every point already written."""
        if len(upload.raw) > self._settings.max_document_bytes:
            raise PayloadTooLargeError(
                f"The document is {len(upload.raw)} bytes; at most {self._settings.max_document_bytes} are accepted.",
                param="file",
            )
        limits = ExtractionLimits(
            max_pages=self._settings.max_document_pages,
            max_characters=self._settings.max_document_characters,
            max_stream_bytes=self._settings.max_pdf_stream_bytes,
            max_content_bytes=self._settings.max_pdf_content_bytes,
        )
        chunks, tokens = await self._extraction.run(
            self._documents.prepare, upload.raw, upload.media_type, limits, self._chunking
        )
        if len(chunks) > self._settings.max_document_chunks:
            raise PayloadTooLargeError(
                f"The document makes {len(chunks)} chunks; at most {self._settings.max_document_chunks} are accepted.",
                param="file",
            )
        document = RagDocument(
            collection_id=collection.id,
            tenant_id=collection.tenant_id,
            name=upload.name,
            media_type=upload.media_type,
            content_hash=hashlib.sha256(upload.raw).hexdigest(),
            size_bytes=len(upload.raw),
            chunks=len(chunks),
            tokens=tokens,
        )
        claimed, new = await asyncio.to_thread(self._catalog.begin_document, collection, document)
        if not new:
            return document_view(claimed), False
        try:
            await self._store.delete_document(qdrant_name(collection.id), claimed.id)  # a dead claim's leftovers
            await self._write_chunks(caller, collection, claimed, chunks)
            ready = await asyncio.to_thread(self._catalog.finish_document, collection, claimed.id)
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(self._discard(collection, claimed.id)))
            raise
        self.cache.forget(collection.id)
        return document_view(ready), True

    async def _write_chunks(
        self, caller: Caller, collection: RagCollection, document: RagDocument, chunks: list[Chunk]
    ) -> None:
        name, batch = qdrant_name(collection.id), self._settings.embed_batch
        for number, first in enumerate(range(0, len(chunks), batch)):
            part = chunks[first : first + batch]
            vectors, _ = await self._embed(INGEST, [chunk.text for chunk in part], caller.sub(str(number)))
            payloads = [
                {
                    "tenant_id": collection.tenant_id,
                    "document_id": document.id,
                    "document_name": document.name,
                    "chunk_index": chunk.index,
                    "text": chunk.text,
                    "tokens": chunk.tokens,
                }
                for chunk in part
            ]
            await self._store.upsert(name, [point_id(document.id, chunk.index) for chunk in part], vectors, payloads)
            done = first + len(part)
            await asyncio.to_thread(self._catalog.progress, document.id, done)
            log.info("ingesting %s into %s: %d of %d chunks", document.id, collection.id, done, len(chunks))

    async def _remove(self, collection: RagCollection, document_id: str) -> None:
        """A document's points, then its row (which bumps the collection's version)."""
        await self._store.delete_document(qdrant_name(collection.id), document_id)
        await asyncio.to_thread(self._catalog.forget_document, collection, document_id)
        self.cache.forget(collection.id)

    async def _discard(self, collection: RagCollection, document_id: str) -> None:
        try:
            await self._remove(collection, document_id)
        except Exception:
            log.exception("could not remove the partly ingested document %s; its row stays `ingesting`", document_id)

    async def delete_document(self, principal: Principal, collection_id: str, document_id: str) -> None:
        collection = await self.collection(principal, collection_id, write=True)
        document = await asyncio.to_thread(self._catalog.document, collection, document_id)
        await self._remove(collection, document.id)

    # retrieval

    async def _embed(self, endpoint: Endpoint, texts: list[str], caller: Caller) -> tuple[list[list[float]], int]:
        body = embeddings_request(self._settings.embedding_model, texts)
        result = await self._serving.handle(
            endpoint, body, caller.request_id, caller.principal, caller.source, caller.link
        )
        assert isinstance(result, JSONResult)  # embeddings are never streamed
        return embeddings_of(result.body, len(texts))

    async def search(self, caller: Caller, collection: RagCollection, query: str, top_k: int | None) -> Found:
        top_k = self._settings.default_top_k if top_k is None else top_k
        if not query.strip():
            raise InvalidRequestError("The query is empty.", param="query")
        if not 1 <= top_k <= self._settings.max_top_k:
            raise InvalidRequestError(f"top_k must be between 1 and {self._settings.max_top_k}.", param="top_k")
        key = (collection.id, collection.version, top_k, query)
        cached = self.cache.get(key)
        if cached is not None:
            return Found(cached.passages, cached.query_tokens, 0.0, 0.0, cached=True)
        started = time.perf_counter()
        vectors, query_tokens = await self._embed(QUERY, [query], caller)
        embedded = time.perf_counter()
        hits = await self._store.search(qdrant_name(collection.id), vectors[0], top_k, query)
        ready = await asyncio.to_thread(
            self._catalog.ready_documents, collection.id, {str(hit.payload.get("document_id")) for hit in hits}
        )
        searched = time.perf_counter()
        passages = [
            Passage(
                document_id=str(hit.payload["document_id"]),
                document_name=ready[str(hit.payload["document_id"])].name,
                chunk_index=int(hit.payload.get("chunk_index", 0)),
                text=str(hit.payload.get("text", "")),
                score=hit.score,
                tokens=int(hit.payload.get("tokens", 0)),
            )
            for hit in hits
            if str(hit.payload.get("document_id")) in ready  # never a document still being ingested
        ]
        found = Found(passages, query_tokens, (embedded - started) * 1000.0, (searched - embedded) * 1000.0, False)
        self.cache.put(key, found)
        return found

    async def query(self, caller: Caller, collection_id: str, query: str, top_k: int | None) -> dict[str, Any]:
        collection = await self.collection(caller.principal, collection_id, content=True)
        found = await self.search(caller, collection, query, top_k)
        if found.cached:  # no engine call was made: the answer is admitted and recorded here
            await self._cached_answers.admit(
                principal=caller.principal,
                request_id=caller.request_id,
                source=caller.source,
                link=caller.link,
                route=self._router.route(self._settings.embedding_model),
                endpoint=QUERY.path,
                collection_id=collection.id,
                query=query,
            )
        return {
            "object": "list",
            "collection_id": collection.id,
            "data": [passage.view() for passage in found.passages],
            "usage": {
                "prompt_tokens": 0 if found.cached else found.query_tokens,
                "embed_ms": round(found.embed_ms, 3),
                "search_ms": round(found.search_ms, 3),
                "cached": found.cached,
            },
        }

    async def chat(self, caller: Caller, body: bytes) -> JSONResult | StreamRelay:
        """Retrieve for the last user message, answer from the sources, and cite them."""
        data = decode_json_object(body)
        collection_id = data.pop("collection_id", None)
        top_k = data.pop("top_k", None)
        if not isinstance(collection_id, str) or not collection_id:
            raise InvalidRequestError("Name the collection to answer from.", param="collection_id")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)):
            raise InvalidRequestError("top_k must be a whole number.", param="top_k")
        question = last_user_text(data.get("messages"))
        collection = await self.collection(caller.principal, collection_id, content=True)
        route = self._router.route(str(data.get("model") or ""))
        found = await self.search(caller.sub("q"), collection, question, top_k)
        used = fit(found.passages, self._settings.max_context_tokens)
        sources = sources_block(used)
        injected = await self._router.count_prompt_tokens(route, {"prompt": sources}, caller.request_id) if used else 0
        data["messages"] = [{"role": "system", "content": GROUNDING + sources}, *data["messages"]]
        stats = RetrievalStats(
            embed_ms=found.embed_ms,
            search_ms=found.search_ms,
            chunks_injected=len(used),
            injected_tokens=injected,
            cached=found.cached,
        )
        citations = [dict(passage.view(), index=number) for number, passage in enumerate(used, 1)]
        result = await self._serving.handle(
            CHAT, msgspec.json.encode(data), caller.request_id, caller.principal, caller.source, caller.link, stats
        )
        retrieval = {
            "collection_id": collection.id,
            "chunks_injected": len(used),
            "injected_tokens": injected,
            "embed_ms": round(found.embed_ms, 3),
            "search_ms": round(found.search_ms, 3),
            "cached": found.cached,
        }
        if isinstance(result, StreamRelay):
            prelude = {
                "id": f"rag-{caller.request_id}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": route.model,
                "choices": [],
                "citations": citations,
                "retrieval": retrieval,
            }
            result.prelude.append(sse(msgspec.json.encode(prelude)))
            return result
        answer = msgspec.json.decode(result.body)
        answer["citations"] = mark_cited(citations, answer)
        answer["retrieval"] = retrieval
        result.body = msgspec.json.encode(answer)
        return result


def last_user_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("`messages` must be a non-empty list.", param="messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                parts = [part for part in content if isinstance(part, dict) and part.get("type") == "text"]
                content = " ".join(str(part.get("text", "")) for part in parts)
            if isinstance(content, str) and content.strip():
                return content
            break
    raise InvalidRequestError("The last user message has no text to retrieve for.", param="messages")


def fit(passages: list[Passage], budget_tokens: int) -> list[Passage]:
    """The best-ranked passages whose text fits the context budget (at least the first one)."""
    used: list[Passage] = []
    spent = 0
    for passage in passages:
        if used and spent + passage.tokens > budget_tokens:
            break
        used.append(passage)
        spent += passage.tokens
    return used


def sources_block(passages: list[Passage]) -> str:
    return "\n\n".join(f"[{number}] ({p.document_name}) {p.text}" for number, p in enumerate(passages, 1))


def mark_cited(citations: list[dict[str, Any]], answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Each citation says whether the answer refers to it by its number."""
    text = " ".join(str((choice.get("message") or {}).get("content") or "") for choice in answer.get("choices") or [])
    return [dict(citation, cited=f"[{citation['index']}]" in text) for citation in citations]

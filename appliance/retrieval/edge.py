"""The embedded vector store on Qdrant's own engine, in process: Qdrant Edge (``qdrant-edge-py``).

**A shard per collection, not payload partitioning.** Each appliance collection is one ``EdgeShard`` in its own
folder (``<root>/edge/<qdrant name>``). Which tenant may reach a collection is decided by the database row before
this module is asked anything (as with the other backends); a shard per collection then adds, for free:
- no query can reach another tenant's points by a missing filter: there are none of theirs in the shard;
- deleting a collection or a tenant removes folders: the vectors are gone from disk, which a test can check;
- search cost and the HNSW build grow with one collection, not with every tenant's points together, and a
  collection may have its own dimensions (a new embedding model);
- its cost is one WAL and a few open files per open shard, opened lazily on first use.

**Durability.** Every update goes through the shard's write-ahead log before it returns, so a process killed at
any point leaves a shard that loads and replays its log (tests/unit/retrieval/test_edge_crash.py kills one for
real). Whether a document is *searchable* is not decided here: the service shows only documents whose catalog
row is ``ready``, written after the last point; a killed ingestion leaves points of an ``ingesting`` row,
invisible to search, removed when the claim is taken over (the contract of the other backends).

**HNSW.** Qdrant Edge has no background optimizer: ``EdgeShard.optimize()`` builds the index and blocks. It also
holds Python's GIL for its whole run (measured: a 30,000-point build froze every thread of the process for
24 s), so it never runs in the gateway's process. When ``optimize_after`` points have been written to a shard
since its last build, a worker thread copies the shard (flushed, writes paused for the copy), builds the index
on the copy in a child process (:mod:`appliance.retrieval.edge_build`), then swaps the built copy in and
replays the writes made meanwhile. Queries keep answering from the old shard all along; only the swap (close,
two renames, load, replay) holds them. A crash during the swap is repaired on the next open: the old
shard, kept as ``.old`` until the new one holds every write, wins.

**One process.** A shard's WAL is locked by the process that loads it (a second ``EdgeShard.load`` fails with
``WouldBlock``), so the store folder belongs to one process; it takes ``<root>/.lock`` (the lock Qdrant local
mode takes, which backups and restores already check) for as long as it is open.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import qdrant_edge as qe

from appliance.lib.errors import ServiceUnavailableError
from appliance.retrieval.vectors import Hit
from appliance.settings import HNSW_EF, HNSW_EF_CONSTRUCT, HNSW_M

log = logging.getLogger(__name__)
T = TypeVar("T")

DENSE, SPARSE = "dense", "bm25"
SUFFIXES = (".new", ".build", ".old", ".trash")


def _document_filter(document_id: str) -> qe.Filter:
    return qe.Filter(must=[qe.FieldCondition(key="document_id", match=qe.MatchValue(value=document_id))])


def hnsw_config(m: int, ef_construct: int) -> qe.HnswIndexConfig:
    """The dense vectors' graph: ``m`` links per point, ``ef_construct`` candidates per point while building
    (Qdrant's defaults are 16 and 100: recall@10 0.864 at 100,000 points of bench/retrieval.py with ``hnsw_ef``
    128, 0.917 at 1,024; m 64 gives 0.980 at 512 in under a millisecond: the graph, not the search, was short).
    Segments under 10,000 KB are scanned exactly (Qdrant's ``full_scan_threshold``)."""
    return qe.HnswIndexConfig(m=m, ef_construct=ef_construct, full_scan_threshold=10_000)


def _config(dimensions: int, indexing_threshold_kb: int | None, m: int, ef_construct: int) -> qe.EdgeConfig:
    """Cosine dense vectors and BM25 sparse ones (IDF computed by the engine); segments past the indexing
    threshold (Qdrant's default: 10,000 KB, about 6,500 vectors of 384 dimensions) get an HNSW index when built,
    smaller ones are searched exhaustively, which is as fast at that size."""
    return qe.EdgeConfig(
        vectors={DENSE: qe.EdgeVectorParams(size=dimensions, distance=qe.Distance.Cosine)},
        sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        hnsw_config=hnsw_config(m, ef_construct),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=indexing_threshold_kb),
    )


COMPACT_EVERY = 1_000  # points written between two looks at how many of them a shard still holds


class _Shard:
    """One open shard; ``write`` serialises updates and the swap; ``pending`` holds the writes made while a
    copy of it is being indexed (replayed on the copy before it replaces this one)."""

    def __init__(self, shard: qe.EdgeShard) -> None:
        self.shard = shard
        self.write = threading.Lock()
        self.swap = threading.RLock()  # held by queries for their call, by the swap for its renames
        self.written = 0  # points written since the last build
        self.checked = 0  # ``written`` when it was last weighed against the points the shard holds
        self.building = False
        self.pending: list[qe.UpdateOperation] | None = None


class EdgeStore:
    """The vector store on Qdrant Edge; see the module's docstring for the layout and its guarantees."""

    def __init__(
        self,
        root: Path,
        *,
        hybrid: bool = True,
        optimize_after: int = 20_000,
        lock: bool = True,
        build_timeout_s: float = 3600.0,
        indexing_threshold_kb: int | None = None,
        hnsw_ef: int = HNSW_EF,
        hnsw_m: int = HNSW_M,
        hnsw_ef_construct: int = HNSW_EF_CONSTRUCT,
    ) -> None:
        self._root = root
        self._folder = root / "edge"
        self._hybrid = hybrid
        self._optimize_after = optimize_after
        self._take_lock = lock
        self._build_timeout_s = build_timeout_s
        self._indexing_threshold_kb = indexing_threshold_kb
        self._params = qe.SearchParams(hnsw_ef=hnsw_ef)
        self._hnsw = (hnsw_m, hnsw_ef_construct)
        self._lock_file: IO[bytes] | None = None
        self._shards: dict[str, _Shard] = {}
        self._open_lock = threading.Lock()
        self._bm25: qe.Bm25 | None = None
        self._builds: list[threading.Thread] = []
        self._children: set[subprocess.Popen[str]] = set()
        self._closing = False

    @property
    def where(self) -> str:
        return str(self._folder)

    @property
    def bm25(self) -> qe.Bm25:
        if self._bm25 is None:
            self._bm25 = qe.Bm25()
        return self._bm25

    # opening and closing

    def _start(self) -> None:
        if self._lock_file is not None or not self._take_lock:
            self._folder.mkdir(parents=True, exist_ok=True)
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        handle = (self._root / ".lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ServiceUnavailableError(
                f"The vector store at {self._root} is open in another process.", code="retrieval_unavailable"
            ) from None
        self._lock_file = handle

    def _path(self, name: str, suffix: str = "") -> Path:
        return self._folder / f"{name}{suffix}"

    def _repair(self, name: str) -> None:
        """Finish or undo what a killed process left of a create, a swap or a drop."""
        old, live = self._path(name, ".old"), self._path(name)
        if old.exists():  # killed during a swap: the old shard holds every write
            if live.exists():
                shutil.rmtree(live)
            old.rename(live)
        for suffix in (".new", ".build", ".trash"):
            shutil.rmtree(self._path(name, suffix), ignore_errors=True)

    def _get(self, name: str, dimensions: int | None = None) -> _Shard | None:
        with self._open_lock:
            shard = self._shards.get(name)
            if shard is not None:
                return shard
            self._start()
            self._repair(name)
            path = self._path(name)
            if path.exists():
                shard = _Shard(qe.EdgeShard.load(str(path)))
            elif dimensions is not None:
                staging = self._path(name, ".new")  # created aside, renamed: never half a shard under its name
                made = qe.EdgeShard.create(str(staging), _config(dimensions, self._indexing_threshold_kb, *self._hnsw))
                made.update(qe.UpdateOperation.create_field_index("document_id", qe.PayloadSchemaType.Keyword))
                made.flush()
                made.close()
                staging.rename(path)
                shard = _Shard(qe.EdgeShard.load(str(path)))
            else:
                return None
            self._shards[name] = shard
            return shard

    def open(self) -> None:
        """Take the store's folder now (its ``.lock``): ServiceUnavailableError when another process has it."""
        with self._open_lock:
            self._start()

    def call(self, work: Callable[[], T]) -> T:
        try:
            return work()
        except ServiceUnavailableError:
            raise
        except Exception as exc:
            raise ServiceUnavailableError(
                f"The vector store failed: {type(exc).__name__}: {exc}", code="retrieval_unavailable"
            ) from exc

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.to_thread(self.call, work)

    def wait_for_builds(self, timeout_s: float | None = None) -> None:
        """Wait for the index builds started so far (tests, the benchmark, a clean shutdown)."""
        for thread in list(self._builds):
            thread.join(timeout_s)

    def close(self) -> None:
        """Close every shard (flushed). A build under way is stopped: its copy is discarded, the shard stays as it
        was (searched without the new index until the next build)."""
        self._closing = True
        for child in list(self._children):
            child.kill()
        self.wait_for_builds(60)
        with self._open_lock:
            for shard in self._shards.values():
                with shard.write, shard.swap:
                    shard.shard.flush()
                    shard.shard.close()
            self._shards.clear()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
            self._closing = False

    # the store's operations

    async def create(self, name: str, dimensions: int) -> None:
        await self._run(lambda: self.create_now(name, dimensions))

    def create_now(self, name: str, dimensions: int) -> None:
        self._get(name, dimensions)

    async def drop(self, name: str) -> None:
        await self._run(lambda: self.drop_now(name))

    def drop_now(self, name: str) -> None:
        with self._open_lock:
            self._start()
            shard = self._shards.pop(name, None)
            if shard is not None:
                with shard.write, shard.swap:
                    shard.shard.close()
            self._repair(name)
            if self._path(name).exists():  # renamed first: a kill mid-delete leaves no half shard
                self._path(name).rename(self._path(name, ".trash"))
                shutil.rmtree(self._path(name, ".trash"))

    def _apply(self, shard: _Shard, operation: qe.UpdateOperation) -> None:
        with shard.write:
            shard.shard.update(operation)
            if shard.pending is not None:
                shard.pending.append(operation)

    async def upsert(
        self, name: str, ids: Sequence[str], vectors: Sequence[list[float]], payloads: Sequence[dict[str, Any]]
    ) -> None:
        await self._run(lambda: self.upsert_now(name, ids, vectors, payloads))

    def upsert_now(
        self, name: str, ids: Sequence[str], vectors: Sequence[list[float]], payloads: Sequence[dict[str, Any]]
    ) -> None:
        shard = self._get(name)
        if shard is None:
            raise ServiceUnavailableError(f"The vector collection {name} does not exist.")
        points = [
            qe.Point(pid, self._vectors(vector, payload), payload)
            for pid, vector, payload in zip(ids, vectors, payloads, strict=True)
        ]
        self._apply(shard, qe.UpdateOperation.upsert_points(points))
        shard.written += len(points)
        if not shard.building and self._build_due(shard):
            self._start_build(name, shard)

    def _build_due(self, shard: _Shard) -> bool:
        """Past ``optimize_after`` points written, or, weighed every ``COMPACT_EVERY`` points, when most of what
        was written since the last build is gone again (documents deleted or written again). A shard keeps the
        points deleted since its last build in memory (about 6 KB each, measured), and a build drops them: a
        collection whose documents are replaced grew by those 6 KB a point until ``optimize_after`` (the
        gateway grew 14 % in the 30-minute soak), and now stays within a few times what it holds."""
        if shard.written >= self._optimize_after:
            return True
        if shard.written - shard.checked < COMPACT_EVERY:
            return False
        shard.checked = shard.written
        with shard.swap:
            held = int(shard.shard.count(qe.CountRequest(exact=True)))
        return shard.written > 2 * held

    def _vectors(self, vector: list[float], payload: dict[str, Any]) -> dict[str, Any]:
        return {DENSE: vector, SPARSE: self.bm25.embed_document(str(payload.get("text", "")))}

    async def search(self, name: str, vector: list[float], limit: int, text: str | None = None) -> list[Hit]:
        """The ``limit`` nearest chunks; with ``text`` (and hybrid on), dense and BM25 results fused by
        reciprocal rank, so an exact identifier that the embedding blurs is still found."""
        return await self._run(lambda: self.search_now(name, vector, limit, text))

    def search_now(self, name: str, vector: list[float], limit: int, text: str | None = None) -> list[Hit]:
        shard = self._get(name)
        if shard is None:
            return []
        if self._hybrid and text and text.strip():
            depth = max(limit * 4, 20)
            request = qe.QueryRequest(
                limit=limit,
                prefetches=[
                    qe.Prefetch(limit=depth, query=qe.Query.Nearest(vector, using=DENSE), params=self._params),
                    qe.Prefetch(limit=depth, query=qe.Query.Nearest(self.bm25.embed_query(text), using=SPARSE)),
                ],
                query=qe.Fusion.Rrf(k=60),  # type: ignore[arg-type]  # the stub omits Fusion.Rrf
                with_payload=True,
            )
        else:
            request = qe.QueryRequest(
                limit=limit, query=qe.Query.Nearest(vector, using=DENSE), with_payload=True, params=self._params
            )
        with shard.swap:
            found = shard.shard.query(request)
        return [Hit(str(point.id), float(point.score), dict(point.payload or {})) for point in found]

    def set_hnsw_ef(self, hnsw_ef: int) -> None:
        """Candidates per search from now on (the benchmark's trade-off table sweeps it on one built index)."""
        self._params = qe.SearchParams(hnsw_ef=hnsw_ef)

    def exact_search(self, name: str, vector: list[float], limit: int) -> list[str]:
        """Point ids of the exact nearest neighbours (no index): what recall is measured against."""
        shard = self._get(name)
        if shard is None:
            return []
        request = qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(vector, using=DENSE), params=qe.SearchParams(exact=True)
        )
        with shard.swap:
            return [str(point.id) for point in shard.shard.query(request)]

    async def delete_document(self, name: str, document_id: str) -> None:
        await self._run(lambda: self.delete_document_now(name, document_id))

    def delete_document_now(self, name: str, document_id: str) -> None:
        shard = self._get(name)
        if shard is not None:
            self._apply(shard, qe.UpdateOperation.delete_points_by_filter(_document_filter(document_id)))

    async def count(self, name: str, document_id: str | None = None) -> int:
        return await self._run(lambda: self.count_now(name, document_id))

    def count_now(self, name: str, document_id: str | None = None) -> int:
        shard = self._get(name)
        if shard is None:
            return 0
        selector = _document_filter(document_id) if document_id is not None else None
        with shard.swap:
            return int(shard.shard.count(qe.CountRequest(exact=True, filter=selector)))

    def snapshot_now(self, target: str) -> list[str]:
        """Copy every shard into ``target/<name>``, each one whole: its writes wait while it is flushed and
        copied (queries go on), so the copy holds every write acknowledged before and none half-applied (what an
        online backup takes). Returns the shards copied."""
        with self._open_lock:
            self._start()
        names = sorted(
            path.name for path in self._folder.iterdir() if path.is_dir() and not path.name.endswith(SUFFIXES)
        )
        destination = Path(target)
        destination.mkdir(parents=True, exist_ok=True)
        for name in names:
            shard = self._get(name)
            if shard is None:
                continue
            with shard.write:  # the swap of a build takes this lock too: never a half-swapped shard
                shard.shard.flush()
                shutil.copytree(self._path(name), destination / name)
        return names

    def indexed(self, name: str) -> int:
        """Vectors covered by an index (HNSW for dense, the inverted index for sparse)."""
        shard = self._get(name)
        return 0 if shard is None else int(shard.shard.info().indexed_vectors_count)

    # building the HNSW index off the process

    def _start_build(self, name: str, shard: _Shard) -> None:
        shard.building = True
        thread = threading.Thread(target=self._build, args=(name,), name=f"edge-build-{name}", daemon=True)
        self._builds = [t for t in self._builds if t.is_alive()] + [thread]
        thread.start()

    def build(self, name: str) -> dict[str, Any]:
        """Build the index of a shard now (in a child process) and swap it in; what the build measured."""
        self.wait_for_builds()  # one build of a shard at a time
        shard = self._get(name)
        if shard is None:
            raise ServiceUnavailableError(f"The vector collection {name} does not exist.")
        shard.building = True
        return self._build(name)

    def _build(self, name: str) -> dict[str, Any]:
        shard = self._shards[name]
        copy = self._path(name, ".build")
        try:
            with shard.write:
                shutil.rmtree(copy, ignore_errors=True)
                shard.shard.flush()
                shutil.copytree(self._path(name), copy)
                shard.pending = []
                shard.written = shard.checked = 0
            if self._closing:
                raise RuntimeError("the store is closing")
            m, ef_construct = self._hnsw
            command = [
                sys.executable,
                str(Path(__file__).with_name("edge_build.py")),
                str(copy),
                str(m),
                str(ef_construct),
            ]
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._children.add(child)
            try:
                out, err = child.communicate(timeout=self._build_timeout_s)
            finally:
                self._children.discard(child)
            if child.returncode != 0:
                raise RuntimeError(f"the index build exited with {child.returncode}: {err.strip()[-500:]}")
            measured: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            with shard.write, shard.swap:
                if self._closing:
                    raise RuntimeError("the store is closing")
                self._swap(name, shard)
            log.info("vector index of %s built in %.1f s", name, measured["seconds"])
            return measured
        except Exception as exc:
            log.exception("building the vector index of %s failed; it is searched without one", name)
            shutil.rmtree(copy, ignore_errors=True)
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            shard.pending = None
            shard.building = False

    def _swap(self, name: str, shard: _Shard) -> None:
        """The built copy replaces the shard (both locks held): the old one stays as ``.old`` until the new one
        has replayed every write made during the build and flushed it."""
        live, old, built = self._path(name), self._path(name, ".old"), self._path(name, ".build")
        shard.shard.close()
        try:
            live.rename(old)
            built.rename(live)
            fresh = qe.EdgeShard.load(str(live))
            for operation in shard.pending or []:
                fresh.update(operation)
            fresh.flush()
        except Exception:
            self._repair(name)  # the old shard comes back, with every write
            shard.shard = qe.EdgeShard.load(str(live))
            raise
        trash = self._path(name, ".trash")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        shard.shard = fresh

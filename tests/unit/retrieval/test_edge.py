"""The embedded vector store on the real Qdrant Edge engine (on disk): writes, restart, isolation, hybrid search,
and the HNSW index built in a child process while queries keep answering."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from appliance.lib.errors import ServiceUnavailableError
from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.vectors import point_id


def unit(index: int, dims: int = 8) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(dims)]


async def test_write_search_count_delete_and_reopen(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "q")
    await store.create("c", 8)
    await store.create("c", 8)  # idempotent
    ids = [point_id("doc_a", i) for i in range(3)] + [point_id("doc_b", 0)]
    payloads = [{"document_id": "doc_a", "chunk_index": i} for i in range(3)] + [{"document_id": "doc_b"}]
    await store.upsert("c", ids, [unit(0), unit(1), unit(2), unit(3)], payloads)
    await store.upsert("c", ids[:1], [unit(0)], payloads[:1])  # the same point again: overwritten, not added
    assert await store.count("c") == 4 and await store.count("c", "doc_a") == 3
    hits = await store.search("c", unit(2), 2)
    assert hits[0].payload == {"document_id": "doc_a", "chunk_index": 2} and hits[0].score == pytest.approx(1.0)
    assert hits[0].point_id == ids[2]
    await store.delete_document("c", "doc_a")
    assert await store.count("c") == 1
    store.close()
    reopened = EdgeStore(tmp_path / "q")
    assert await reopened.count("c") == 1, "the shard keeps its points across a restart"
    assert await reopened.search("missing", unit(0), 3) == [] and await reopened.count("missing") == 0
    await reopened.drop("c")
    assert await reopened.count("c") == 0 and not (tmp_path / "q" / "edge" / "c").exists()
    reopened.close()


async def test_collections_are_separate_shards_and_the_folder_belongs_to_one_process(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "q")
    await store.create("tenant_a", 8)
    await store.create("tenant_b", 8)
    await store.upsert("tenant_a", [point_id("a", 0)], [unit(1)], [{"document_id": "a", "text": "secret of a"}])
    await store.upsert("tenant_b", [point_id("b", 0)], [unit(2)], [{"document_id": "b", "text": "plan of b"}])
    found = await store.search("tenant_b", unit(1), 10, "secret of a")
    assert [hit.payload["document_id"] for hit in found] == ["b"], "a search never leaves its collection's shard"
    second = EdgeStore(tmp_path / "q")
    with pytest.raises(ServiceUnavailableError, match="open in another process"):
        await second.count("tenant_a")
    store.close()
    assert await second.count("tenant_a") == 1  # free once the first store is closed
    second.close()


async def test_a_bad_write_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "q")
    await store.create("c", 8)
    with pytest.raises(ServiceUnavailableError, match="vector store failed"):
        await store.upsert("c", [point_id("d", 0)], [[1.0, 2.0]], [{}])  # wrong dimensions
    with pytest.raises(ServiceUnavailableError, match="does not exist"):
        await store.upsert("nowhere", [point_id("d", 0)], [unit(0)], [{}])
    assert await store.count("c") == 0
    store.close()


async def test_hybrid_search_finds_an_exact_part_number_that_dense_search_misses(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    dims = 32
    vectors = rng.normal(size=(60, dims))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = [f"maintenance note {n}: the pump was inspected and the filter replaced" for n in range(60)]
    texts[41] = "maintenance note 41: replace valve part ZX-4471-B before the winter season"
    query = "part ZX-4471-B"  # words no other note has: BM25 ranks one chunk, no ties
    query_vector = vectors[7] + 0.05 * rng.normal(size=dims)  # the embedding lands near an unrelated note
    store = EdgeStore(tmp_path / "q")
    await store.create("c", dims)
    ids = [point_id("d", n) for n in range(60)]
    payloads = [{"document_id": "d", "chunk_index": n, "text": text} for n, text in enumerate(texts)]
    await store.upsert("c", ids, vectors.tolist(), payloads)
    dense = [hit.payload["chunk_index"] for hit in await store.search("c", query_vector.tolist(), 4)]  # no text
    hybrid = [hit.payload["chunk_index"] for hit in await store.search("c", query_vector.tolist(), 4, query)]
    assert 41 not in dense, "dense search alone misses the part number"
    assert 41 in hybrid and dense[0] in hybrid, "hybrid finds it and keeps the best dense match"
    store.close()


async def test_the_index_is_built_off_process_while_queries_and_writes_go_on(tmp_path: Path) -> None:
    """Past ``optimize_after`` points a build starts; queries answer throughout (the gateway's thread is never
    frozen by optimize(), which holds the GIL), writes made during the build are in the new shard."""
    rng = np.random.default_rng(1)
    dims, count = 64, 12_000
    vectors = rng.normal(size=(count + 50, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = EdgeStore(tmp_path / "q", optimize_after=count, indexing_threshold_kb=1000)  # 12,000 x 64 = 3 MB
    await store.create("c", dims)
    for first in range(0, count, 2000):
        ids = [point_id("d", n) for n in range(first, first + 2000)]
        await store.upsert("c", ids, vectors[first : first + 2000].tolist(), [{"document_id": "d"}] * 2000)
    assert store._shards["c"].building, "the build started in the background"
    assert store.indexed("c") < count
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:  # a pure-Python thread: would stop if the build held the GIL in this process
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.005)

    ticker = threading.Thread(target=tick)
    ticker.start()
    answered, late = 0, [point_id("late", n) for n in range(50)]
    while store._shards["c"].building:
        hits = await store.search("c", vectors[answered % count].tolist(), 1)
        assert hits and hits[0].point_id == point_id("d", answered % count)
        if answered < 50:
            await store.upsert("c", [late[answered]], [vectors[count + answered].tolist()], [{"document_id": "l"}])
        answered += 1
    done.set()
    ticker.join()
    store.wait_for_builds()
    assert answered >= 10, "queries kept answering during the build"
    assert max(np.diff(ticks)) < 0.5, "no thread of this process was frozen"
    assert store.indexed("c") >= count, "the swapped-in shard has its HNSW index"
    assert await store.count("c") == count + min(answered, 50), "writes made during the build were replayed"
    hits = await store.search("c", vectors[count].tolist(), 1)
    assert hits[0].point_id == late[0]
    store.close()
    assert sorted(p.name for p in (tmp_path / "q" / "edge").iterdir()) == ["c"], "no copy is left behind"


def hnsw_of_segments(shard: Path) -> list[tuple[int, int]]:
    """(m, ef_construct) of each HNSW-indexed segment, as the engine recorded them."""
    found = []
    for path in (shard / "segments").glob("*/segment.json"):
        index = json.loads(path.read_text())["config"]["vector_data"]["dense"]["index"]
        if index["type"] == "hnsw":
            found.append((index["options"]["m"], index["options"]["ef_construct"]))
    return found


async def test_a_collection_whose_documents_are_replaced_is_compacted_and_a_growing_one_is_left_alone(
    tmp_path: Path,
) -> None:
    """A shard keeps deleted points in memory until its next build: one whose documents keep being replaced
    (the soak's RAG uploads, each deleting the oldest) is rebuilt long before ``optimize_after``, which drops
    them; one that only grows waits for ``optimize_after`` as before."""
    store = EdgeStore(tmp_path / "q", optimize_after=1 << 62)
    await store.create("churn", 8)
    await store.create("grow", 8)
    for n in range(24):  # 24 documents of 50 points, two kept: 1,200 written, 100 held
        ids = [point_id(f"d{n}", i) for i in range(50)]
        await store.upsert("churn", ids, [unit(i % 8) for i in range(50)], [{"document_id": f"d{n}"}] * 50)
        await store.upsert("grow", ids, [unit(i % 8) for i in range(50)], [{"document_id": f"d{n}"}] * 50)
        if n >= 2:
            await store.delete_document("churn", f"d{n - 2}")
    store.wait_for_builds()
    churn, grow = store._shards["churn"], store._shards["grow"]
    assert churn.written < 1_000 and not churn.building, "the replaced documents' points were compacted away"
    assert await store.count("churn") == 100 and await store.count("churn", "d23") == 50
    assert grow.written == 1_200 and not grow.building, "a growing collection is not rebuilt before its time"
    assert await store.count("grow") == 1_200
    store.close()


async def test_the_hnsw_settings_shape_the_built_index_and_a_changed_setting_applies_to_the_next_build(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(6000, 32)).astype(np.float32)
    store = EdgeStore(
        tmp_path / "q", optimize_after=1 << 62, indexing_threshold_kb=100, hnsw_m=12, hnsw_ef_construct=40
    )
    await store.create("c", 32)
    await store.upsert(
        "c", [point_id("a", n) for n in range(3000)], vectors[:3000].tolist(), [{"document_id": "a"}] * 3000
    )
    assert "error" not in store.build("c")
    assert set(hnsw_of_segments(tmp_path / "q" / "edge" / "c")) == {(12, 40)}
    store.close()
    changed = EdgeStore(
        tmp_path / "q", optimize_after=1 << 62, indexing_threshold_kb=100, hnsw_m=20, hnsw_ef_construct=60
    )
    await changed.upsert(
        "c", [point_id("b", n) for n in range(3000)], vectors[3000:].tolist(), [{"document_id": "b"}] * 3000
    )
    assert "error" not in changed.build("c")
    assert (20, 60) in hnsw_of_segments(tmp_path / "q" / "edge" / "c"), "segments indexed since use the new setting"
    assert changed.indexed("c") >= 6000 and await changed.count("c") == 6000
    changed.close()

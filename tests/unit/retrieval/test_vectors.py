"""The vector store on real Qdrant local mode (on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.lib.errors import ServiceUnavailableError
from appliance.retrieval.vectors import VectorStore, point_id


def unit(index: int, dims: int = 8) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(dims)]


async def test_write_search_count_delete_and_reopen(tmp_path: Path) -> None:
    store = VectorStore(path=tmp_path / "q")
    await store.create("c", 8)
    await store.create("c", 8)  # idempotent
    ids = [point_id("doc_a", i) for i in range(3)] + [point_id("doc_b", 0)]
    payloads = [{"document_id": "doc_a", "chunk_index": i} for i in range(3)] + [{"document_id": "doc_b"}]
    await store.upsert("c", ids, [unit(0), unit(1), unit(2), unit(3)], payloads)
    await store.upsert("c", ids[:1], [unit(0)], payloads[:1])  # the same point again: overwritten, not added
    assert await store.count("c") == 4 and await store.count("c", "doc_a") == 3
    hits = await store.search("c", unit(2), 2)
    assert hits[0].payload == {"document_id": "doc_a", "chunk_index": 2} and hits[0].score == pytest.approx(1.0)
    await store.delete_document("c", "doc_a")
    assert await store.count("c") == 1
    store.close()
    reopened = VectorStore(path=tmp_path / "q")
    assert await reopened.count("c") == 1, "local mode keeps its points on disk"
    assert await reopened.search("missing", unit(0), 3) == [] and await reopened.count("missing") == 0
    await reopened.drop("c")
    assert await reopened.count("c") == 0
    reopened.close()


async def test_point_ids_are_stable_and_a_bad_write_is_a_clear_error(tmp_path: Path) -> None:
    assert point_id("doc", 1) == point_id("doc", 1) != point_id("doc", 2)
    store = VectorStore(path=tmp_path / "q")
    await store.create("c", 8)
    with pytest.raises(ServiceUnavailableError, match="vector store failed"):
        await store.upsert("c", [point_id("d", 0)], [[1.0, 2.0]], [{}])  # wrong dimensions
    store.close()
    with pytest.raises(ValueError):
        VectorStore()

"""A gateway killed (SIGKILL, for real, in a child process) in the middle of an ingestion into Qdrant Edge: the
shard loads, the document is absent from search (never half of it), and its next upload ingests it whole."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.vectors import qdrant_name
from appliance.settings import EngineRoute, GatewaySettings, RetrievalSettings, Settings
from tests.support.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[3]
SMALL = b"The harbour master logs every ship. Case 77-A was closed in May."
LARGE = " ".join(
    f"Line {n} of the ledger: cargo {n * 7} crates of part QX-{n:05d} arrived." for n in range(3000)
).encode()


def crash_settings(data_dir: Path, engine_url: str) -> Settings:
    return Settings(
        data_dir=data_dir,
        models_cache_dir=ROOT / "var" / "models",  # the embedding model's tokenizer chunks the documents
        gateway=GatewaySettings(routes=[EngineRoute(model="minilm-l6-v2", url=engine_url, runner="pooling")]),
        retrieval=RetrievalSettings(embed_batch=4, cache_entries=0),
    )


def large_document(data_dir: Path) -> tuple[str, str, int, int] | None:
    """(id, status, chunks done, chunks) of the large document's row, once it exists."""
    connection = sqlite3.connect(data_dir / "appliance.db", timeout=5)
    try:
        row = connection.execute(
            "SELECT id, status, chunks_done, chunks FROM rag_documents WHERE name = 'large.txt'"
        ).fetchone()
    finally:
        connection.close()
    return None if row is None else (str(row[0]), str(row[1]), int(row[2]), int(row[3]))


async def test_a_process_killed_during_ingestion_leaves_a_sound_shard_and_no_half_document(
    tmp_path: Path, fake_engine: FakeEngine
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.retrieval.crash_child", str(tmp_path), fake_engine.url], cwd=ROOT, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert child.poll() is None, "the child died on its own"
            assert time.monotonic() < deadline, "the large document never started"
            found = large_document(tmp_path) if (tmp_path / "child.json").exists() else None
            if found is not None and found[2] >= 12:  # three batches of 4 are in the shard
                break
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL and not (tmp_path / "child.done").exists()
    shared = json.loads((tmp_path / "child.json").read_text())
    large = large_document(tmp_path)
    assert large is not None and large[1] == "ingesting"
    name = qdrant_name(shared["collection"])

    store = EdgeStore(tmp_path / "qdrant")  # the shard loads and replays its log
    partial = await store.count(name, large[0])
    assert 12 <= partial < large[3], f"killed part-way: {partial} of {large[3]} points of the large document"
    probe = [1.0] + [0.0] * 383
    in_store = {hit.payload["document_id"] for hit in await store.search(name, probe, 10, "crates of part QX-00003")}
    assert large[0] in in_store, "its points are in the shard: only the catalog keeps them out of answers"
    store.close()

    settings = crash_settings(tmp_path, fake_engine.url)
    headers = shared["headers"]
    async with AsyncTestClient(app=create_app(settings)) as client:
        query = {"collection_id": shared["collection"], "query": "cargo crates of part QX-00003", "top_k": 10}
        answer = await client.post("/v1/rag/query", json=query, headers=headers)
        assert answer.status_code == 200, answer.text
        assert "large.txt" not in {p["document_name"] for p in answer.json()["data"]}, "absent, not half there"
        small = dict(query, query="the harbour master and case 77-A")
        answer = await client.post("/v1/rag/query", json=small, headers=headers)
        assert [p["document_name"] for p in answer.json()["data"]][:1] == ["small.txt"], "the store answers"
        # the dead claim is taken over once abandoned (15 minutes): its leftovers removed, the document whole
        connection = sqlite3.connect(tmp_path / "appliance.db")
        connection.execute("UPDATE rag_documents SET updated_at = '2000-01-01 00:00:00' WHERE id = ?", (large[0],))
        connection.commit()
        connection.close()
        documents = f"/v1/rag/collections/{shared['collection']}/documents?name=large.txt"
        again = await client.post(documents, content=LARGE, headers=headers)
        assert again.status_code == 201, again.text
        chunks = again.json()["chunks"]
        view = await client.get(f"/v1/rag/collections/{shared['collection']}", headers=headers)
        assert view.json()["points"] == chunks + 1, "the large document whole, plus the small one's chunk"
        answer = await client.post("/v1/rag/query", json=query, headers=headers)
        assert "large.txt" in {passage["document_name"] for passage in answer.json()["data"]}

"""`appliance retrieval migrate` (the real command, in a subprocess) moves local-mode collections into Qdrant Edge:
the same points, searchable, and refuses while another process holds the folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from appliance.retrieval.edge import EdgeStore
from appliance.retrieval.vectors import VectorStore, point_id

ROOT = Path(__file__).resolve().parents[3]


def run_migrate(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), APPLIANCE_DATA_DIR=str(data_dir))
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "retrieval", "migrate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


async def test_migrate_moves_local_mode_collections_into_qdrant_edge(tmp_path: Path) -> None:
    folder = tmp_path / "qdrant"
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(700, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    local = VectorStore(path=folder)
    for name, count in (("appliance_col_a", 700), ("appliance_col_b", 3)):
        await local.create(name, 16)
        ids = [point_id(name, n) for n in range(count)]
        payloads = [{"document_id": name, "chunk_index": n, "text": f"chunk {n} of {name}"} for n in range(count)]
        await local.upsert(name, ids, vectors[:count].tolist(), payloads)
    refused = run_migrate(tmp_path)  # local mode's lock is held by this process
    assert refused.returncode == 1 and "migration failed" in refused.stderr
    local.close()

    done = run_migrate(tmp_path, "--remove-local")
    assert done.returncode == 0, done.stderr
    assert "appliance_col_a: 700 points" in done.stdout and "2 collections in Qdrant Edge" in done.stdout

    edge = EdgeStore(folder)
    assert await edge.count("appliance_col_a") == 700 and await edge.count("appliance_col_b") == 3
    hits = await edge.search("appliance_col_a", vectors[123].tolist(), 1)
    assert hits[0].point_id == point_id("appliance_col_a", 123)
    assert hits[0].payload == {
        "document_id": "appliance_col_a",
        "chunk_index": 123,
        "text": "chunk 123 of appliance_col_a",
    }
    edge.close()
    emptied = VectorStore(path=folder)
    assert await emptied.count("appliance_col_a") == 0, "--remove-local deleted the local-mode copy"
    emptied.close()

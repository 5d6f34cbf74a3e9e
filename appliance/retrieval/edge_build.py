"""Build a Qdrant Edge shard's index in its own process: ``python edge_build.py FOLDER M EF_CONSTRUCT`` (run
as a script: it needs nothing but ``qdrant_edge``). M and EF_CONSTRUCT are the HNSW settings of this build: the
shard's config is set to them before it is loaded, so a changed setting applies to shards made before it
(to segments indexed from then on).

``EdgeShard.optimize()`` holds Python's GIL until it returns, so the gateway never calls it itself: it copies
the shard and runs this on the copy (see :mod:`appliance.retrieval.edge`). Prints one JSON line: whether
anything was optimised, the seconds it took, the indexed vectors and this process's peak memory (MiB).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import qdrant_edge as qe


def configure(folder: str, m: int, ef_construct: int) -> None:
    """Set the HNSW settings in the copy's ``edge_config.json`` (what ``EdgeShard.load`` reads when it is given
    no config; a partial ``EdgeConfig`` is refused, and the shard's vectors are not ours to restate here)."""
    path = Path(folder) / "edge_config.json"
    config = json.loads(path.read_text())
    hnsw = config.get("hnsw_config") or {"full_scan_threshold": 10_000, "max_indexing_threads": 0}
    config["hnsw_config"] = {**hnsw, "m": m, "ef_construct": ef_construct}
    path.write_text(json.dumps(config))


def main(folder: str, m: int, ef_construct: int) -> int:
    configure(folder, m, ef_construct)
    shard = qe.EdgeShard.load(folder)
    started = time.perf_counter()
    optimized = shard.optimize()
    seconds = time.perf_counter() - started
    indexed = shard.info().indexed_vectors_count
    shard.flush()
    shard.close()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"optimized": optimized, "seconds": seconds, "indexed": indexed, "peak_mib": peak_mib}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))

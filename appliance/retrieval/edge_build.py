"""Build a Qdrant Edge shard's index in its own process: ``python edge_build.py FOLDER`` (run as a
script: it needs nothing but ``qdrant_edge``).

``EdgeShard.optimize()`` holds Python's GIL until it returns, so the gateway never calls it itself: it copies
the shard and runs this on the copy (see :mod:`appliance.retrieval.edge`). Prints one JSON line: whether
anything was optimised, the seconds it took, the indexed vectors and this process's peak memory (MiB).
"""

from __future__ import annotations

import json
import resource
import sys
import time

import qdrant_edge as qe


def main(folder: str) -> int:
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
    sys.exit(main(sys.argv[1]))

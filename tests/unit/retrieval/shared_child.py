"""Another gateway worker process on the same embedded store (run by ``test_edge_shared``):
``python -m tests.unit.retrieval.shared_child ROOT MODE``. It opens the store first (so it owns it), says
``ready`` on stdout, then, by MODE:

- ``write N``: upserts N points one call at a time into collection ``c``, printing ``wrote I`` after each
  call returned, then ``done`` and waits for its stdin to close;
- ``ingest``: upserts documents of 20 points (one call each, document ``doc{I}``) into ``c`` until a file
  ``stop`` appears in ROOT, printing ``wrote I`` after each, then ``done``, and waits for its stdin to close;
- ``serve``: only serves the store until its stdin closes (or it is killed).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from appliance.retrieval.edge_shared import SharedEdgeStore
from appliance.retrieval.vectors import point_id


def vector(index: int, dims: int = 16) -> list[float]:
    return [1.0 if i == index % dims else 0.01 * (index // dims + 1) for i in range(dims)]


async def main(root: Path, mode: str, count: int) -> None:
    store = SharedEdgeStore(root)
    await store.create("c", 16)
    assert store.owner is not None, "the child must be the first to open the store"
    print("ready", flush=True)
    if mode == "write":
        for i in range(count):
            payload = {"document_id": f"child{i}", "text": f"note {i} from the writer"}
            await store.upsert("c", [point_id(f"child{i}", 0)], [vector(i)], [payload])
            print(f"wrote {i}", flush=True)
        print("done", flush=True)
    if mode == "ingest":
        i = 0
        while not (root / "stop").exists():
            ids = [point_id(f"doc{i}", n) for n in range(20)]
            payloads = [{"document_id": f"doc{i}", "chunk_index": n, "text": f"chunk {n} of {i}"} for n in range(20)]
            await store.upsert("c", ids, [vector(i * 20 + n) for n in range(20)], payloads)
            print(f"wrote {i}", flush=True)
            i += 1
        print("done", flush=True)
    sys.stdin.read()  # serve until the test closes our stdin
    store.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0))

"""Retrieval: what it costs a request (embedding + search) at 10,000 and 100,000 chunks, and ingestion speed.

1. Ingestion through the appliance (`POST /v1/rag/collections/{id}/documents`: extract, chunk, embed on the
   real embedding engine, write to Qdrant local mode), in chunks per second, against the embedding engine
   alone fed the same chunk texts in the same batches (the floor ingestion cannot beat).
2. Query latency through the appliance (`POST /v1/rag/query`) on the ingested collection, against the
   embedding engine alone embedding the same queries (cache off: every query differs).
3. At scale (100,000 chunks by default, ``--sizes 100000 1000000``), the old embedded default (qdrant-client's
   local mode, an exhaustive scan) and the new one (Qdrant Edge: HNSW built in a child process, dense + BM25)
   side by side, in this process, on the same points: the ingested chunks' real vectors, and up to the size
   blends of three of them plus a little noise (with a chunk's text for BM25; embedding 100,000 chunks on this
   CPU would take hours). Each query is embedded once by the real engine; printed per store: search P50/P99
   (dense, and hybrid as the appliance serves it), embed + search P50/P99, recall@10 against exact search
   (numpy), fill time, index build time and the build's peak memory, memory held, size on disk; and Qdrant Edge's
   search as another gateway process gets it (over the owner's socket, :mod:`appliance.retrieval.edge_shared`).
   Local mode is skipped past ``--local-max`` points (its scan would take the run's hours, not its answer).
4. With ``--tradeoff``, at the first size: HNSW ``m`` / ``ef_construct`` builds, each searched with several
   ``hnsw_ef``: build time and memory, search P50/P99, recall@10 (how the defaults in settings.py were chosen).

Usage: .venv/bin/python bench/retrieval.py [--documents 40] [--queries 200] [--reuse] [--sizes 100000 1000000]
       [--local-max 100000] [--tradeoff]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.retrieval.edge import EdgeStore  # noqa: E402
from appliance.retrieval.edge_shared import SOCKET, EdgeClient, EdgeServer  # noqa: E402
from appliance.retrieval.vectors import Store, VectorStore, point_id  # noqa: E402
from appliance.settings import HNSW_EF, HNSW_EF_CONSTRUCT, HNSW_M  # noqa: E402
from bench.gateway_overhead import api_key, cli, pct, start_appliance  # noqa: E402

EMBED_MODEL = "minilm-l6-v2"
TOPICS = ["harbour", "orchard", "glacier", "library", "bakery", "observatory", "railway", "vineyard", "mill", "choir"]
WORDS = (
    "report lists shipments delays costs weather rainfall survey measured visitors residents council newsletter "
    "season morning evening river bridge tower market festival garden museum school hospital station archive"
).split()


def document(index: int, paragraphs: int, rng: random.Random) -> str:
    topic = TOPICS[index % len(TOPICS)]
    parts = [f"# The {topic} of district {index}"]
    for p in range(paragraphs):
        words = " ".join(rng.choice(WORDS) for _ in range(60))
        parts.append(f"Paragraph {p} about the {topic} {index}: {words}.")
    return "\n\n".join(parts)


def queries(count: int, rng: random.Random) -> list[str]:
    return [  # all different: the retrieval cache must not answer them
        f"Question {n}: what did the {rng.choice(TOPICS)} survey of district {rng.randrange(100)} say about "
        f"{rng.choice(WORDS)}?"
        for n in range(count)
    ]


def row(label: str, values: list[float]) -> str:
    return f"  {label:<44} P50 {pct(values, 50):8.1f} ms   P99 {pct(values, 99):8.1f} ms"


async def embed(session: aiohttp.ClientSession, url: str, texts: list[str]) -> list[list[float]]:
    async with session.post(url + "/v1/embeddings", json={"model": EMBED_MODEL, "input": texts}) as response:
        assert response.status == 200, await response.text()
        data = (await response.json())["data"]
    return [item["embedding"] for item in sorted(data, key=lambda item: item["index"])]


async def ingestion(gateway: str, engine: str, key: str, documents: list[str]) -> tuple[str, list[str]]:
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=auth, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        name = f"bench-{int(time.time())}"
        async with session.post(gateway + "/v1/rag/collections", json={"name": name}) as response:
            assert response.status == 201, await response.text()
            collection = (await response.json())["id"]
        chunks = 0
        started = time.perf_counter()
        for number, text in enumerate(documents):
            async with session.post(
                f"{gateway}/v1/rag/collections/{collection}/documents?name=doc{number}.md",
                data=text.encode(),
                headers={"Content-Type": "text/markdown"},
            ) as response:
                assert response.status == 201, await response.text()
                chunks += (await response.json())["chunks"]
        appliance_s = time.perf_counter() - started
        texts: list[str] = []
        async with session.get(f"{gateway}/v1/rag/collections/{collection}") as response:
            assert (await response.json())["points"] == chunks
    # the floor: the same number of chunk-sized texts straight to the engine, in the same batch size (32)
    from appliance.retrieval.chunking import Chunker

    chunker = Chunker.from_model_dir(ROOT / "var" / "models" / EMBED_MODEL, 200, 40)
    for text in documents:
        texts.extend(chunk.text for chunk in chunker.split(text)[0])
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        for first in range(0, len(texts), 32):
            await embed(session, engine, texts[first : first + 32])
        engine_s = time.perf_counter() - started
    print(f"\n1. Ingestion of {len(documents)} Markdown documents, {chunks} chunks of <= 200 tokens")
    print(f"  through the appliance: {chunks / appliance_s:7.1f} chunks/s ({appliance_s:.1f} s)")
    print(f"  embedding engine alone: {len(texts) / engine_s:7.1f} chunks/s ({engine_s:.1f} s)")
    print(f"  ratio appliance / engine alone: {(chunks / appliance_s) / (len(texts) / engine_s):.2f}")
    return collection, texts


async def query_latency(gateway: str, engine: str, key: str, collection: str, asked: list[str]) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    through: list[float] = []
    direct: list[float] = []
    async with aiohttp.ClientSession(headers=auth) as session, aiohttp.ClientSession() as plain:
        for query in asked[:5]:  # warm-up
            await embed(plain, engine, [query + " warm"])
        for query in asked:
            started = time.perf_counter()
            async with session.post(
                gateway + "/v1/rag/query", json={"collection_id": collection, "query": query, "top_k": 4}
            ) as response:
                assert response.status == 200, await response.text()
                assert not (await response.json())["usage"]["cached"]
            through.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            await embed(plain, engine, [query + " again"])
            direct.append((time.perf_counter() - started) * 1000)
    print(f"\n2. Query latency, {len(asked)} distinct queries, 1 closed-loop client")
    print(row("embedding engine alone", direct))
    print(row("POST /v1/rag/query (auth, embed, search)", through))
    print(f"  ratio P50 {pct(through, 50) / pct(direct, 50):.2f}   P99 {pct(through, 99) / pct(direct, 99):.2f}")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / (1024 * 1024)


def points(base: np.ndarray, texts: list[str], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``size`` unit vectors: the real chunks' embeddings, then blends of three of them plus a little noise (with
    the text of the chunk that weighs most). Blends stay on the surface real embeddings span, as a corpus does;
    isotropic noise around each chunk instead makes clusters of near-equidistant points in 384 dimensions, where
    no approximate index finds the exact top 10 (measured: recall@10 0.44 at 100,000 with hnsw_ef 128)."""
    extra = max(0, size - len(base))
    picks = rng.integers(0, len(base), (extra, 3))
    weights = rng.dirichlet([1.0, 1.0, 1.0], extra).astype(np.float32)
    vectors = np.empty((len(base) + extra, base.shape[1]), dtype=np.float32)
    vectors[: len(base)] = base
    for first in range(0, extra, 100_000):  # in parts: at 1,000,000 points the whole blend is gigabytes
        last = min(extra, first + 100_000)
        blend = np.einsum("nk,nkd->nd", weights[first:last], base[picks[first:last]])
        vectors[len(base) + first : len(base) + last] = blend + rng.normal(0, 0.01, (last - first, base.shape[1]))
    vectors = vectors[:size]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    source = np.concatenate([np.arange(len(base)), picks[np.arange(extra), weights.argmax(axis=1)]])[:size]
    return vectors.astype(np.float32), [texts[i] for i in source]


async def fill(store: Store, vectors: np.ndarray, texts: list[str]) -> float:
    started = time.perf_counter()
    for first in range(0, len(vectors), 2000):
        part = vectors[first : first + 2000]
        ids = [point_id("scale", first + i) for i in range(len(part))]
        payloads: list[dict[str, Any]] = [
            {"document_id": "scale", "chunk_index": first + i, "text": texts[first + i]} for i in range(len(part))
        ]
        await store.upsert("scale", ids, part.tolist(), payloads)
    return time.perf_counter() - started


async def at_scale(
    engine: str, texts: list[str], asked: list[str], sizes: list[int], local_max: int, tradeoff: bool
) -> None:
    """Qdrant local mode (the old default) and Qdrant Edge (the new one) side by side on the same points and the
    same embedded queries: each query is embedded once by the real engine (its time counts for both)."""
    rng = np.random.default_rng(7)
    async with aiohttp.ClientSession() as session:
        real: list[list[float]] = []
        for first in range(0, len(texts), 32):
            real.extend(await embed(session, engine, texts[first : first + 32]))
        base = np.asarray(real, dtype=np.float32)
        embedded: list[tuple[str, list[float], float]] = []
        for query in asked:
            started = time.perf_counter()
            vector = (await embed(session, engine, [f"{query} (scale)"]))[0]
            embedded.append((query, vector, (time.perf_counter() - started) * 1000))
    embed_ms = [e for _, _, e in embedded]
    print(f"\n3. Embedding + search at scale, {base.shape[1]} dimensions, {len(asked)} queries (top 4; recall@10)")
    print(row("embed (real engine, once per query)", embed_ms))
    print(f"  Qdrant Edge: HNSW m {HNSW_M}, ef_construct {HNSW_EF_CONSTRUCT}, hnsw_ef {HNSW_EF} (settings.py defaults)")
    for number, size in enumerate(sizes):
        vectors, chunk_texts = points(base, texts, size, rng)
        results: dict[str, dict[str, Any]] = {}
        for label in ("local mode (old)", "Qdrant Edge (new)"):
            if label.startswith("local") and size > local_max:
                print(f"\n  {size:,} chunks: local mode not run (past --local-max {local_max:,})")
                continue
            folder = Path(tempfile.mkdtemp(prefix="bench-vectors-"))
            store: Store = (
                VectorStore(path=folder) if label.startswith("local") else EdgeStore(folder, optimize_after=1 << 62)
            )
            try:
                before = rss_mib()
                await store.create("scale", base.shape[1])
                fill_s = await fill(store, vectors, chunk_texts)
                build: dict[str, Any] = {"seconds": 0.0, "peak_mib": 0.0}
                if isinstance(store, EdgeStore):
                    build = store.build("scale")
                grown = rss_mib() - before
                dense: list[float] = []
                hybrid: list[float] = []
                recall: list[float] = []
                for query, vector, _ in embedded:
                    started = time.perf_counter()
                    await store.search("scale", vector, 4)
                    dense.append((time.perf_counter() - started) * 1000)
                    if isinstance(store, EdgeStore):
                        started = time.perf_counter()
                        await store.search("scale", vector, 4, query)
                        hybrid.append((time.perf_counter() - started) * 1000)
                for _, vector, _ in embedded[:100]:
                    found = {hit.point_id for hit in await store.search("scale", vector, 10)}
                    exact = truth(vectors, vector, 10)
                    recall.append(len(found & exact) / 10)
                other = await other_process(store, folder, embedded) if isinstance(store, EdgeStore) else []
                results[label] = {
                    "fill": fill_s,
                    "build": build,
                    "rss": grown,
                    "disk": folder_mib(folder),
                    "dense": dense,
                    "hybrid": hybrid,
                    "recall": float(np.mean(recall)),
                    "other": other,
                }
            finally:
                store.close()
                shutil.rmtree(folder, ignore_errors=True)
        report(size, embed_ms, results)
        if tradeoff and number == 0:
            await hnsw_tradeoff(vectors, chunk_texts, embedded)
        del vectors, chunk_texts


async def other_process(store: EdgeStore, folder: Path, embedded: list[tuple[str, list[float], float]]) -> list[float]:
    """Search P50/P99 (hybrid, as served) from a second process, through this one's socket: what a gateway worker
    that does not own the store gets."""
    server = EdgeServer(store, folder / SOCKET)
    asked = folder / "asked.json"
    asked.write_text(json.dumps([[query, vector] for query, vector, _ in embedded]))
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--socket-client", str(folder / SOCKET), str(asked)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    finally:
        server.close()
    return [float(ms) for ms in json.loads(done.stdout.strip().splitlines()[-1])]


def socket_client(path: str, asked_file: str) -> None:
    """The second process of :func:`other_process`: prints the latency of each search (ms) as a JSON list."""
    client = EdgeClient(Path(path))
    latencies: list[float] = []
    for query, vector in json.loads(Path(asked_file).read_text()):
        started = time.perf_counter()
        client.call("search", "scale", vector, 4, query)
        latencies.append((time.perf_counter() - started) * 1000)
    client.close()
    print(json.dumps(latencies))


TRADEOFF_BUILDS = [(16, 100), (32, 128), (HNSW_M, HNSW_EF_CONSTRUCT)]
TRADEOFF_EFS = [128, 256, HNSW_EF, 1024]


async def hnsw_tradeoff(
    vectors: np.ndarray, chunk_texts: list[str], embedded: list[tuple[str, list[float], float]]
) -> None:
    print(f"\n4. HNSW trade-off at {len(vectors):,} chunks (Qdrant Edge; dense search top 4; recall@10, 100 queries)")
    print(
        f"  {'m':>4}{'ef_construct':>14}{'build s':>9}{'build MiB':>11}{'hnsw_ef':>9}"
        f"{'P50 ms':>9}{'P99 ms':>9}{'recall@10':>11}"
    )
    exact = [truth(vectors, vector, 10) for _, vector, _ in embedded[:100]]
    for m, ef_construct in TRADEOFF_BUILDS:
        folder = Path(tempfile.mkdtemp(prefix="bench-tradeoff-"))
        store = EdgeStore(folder, optimize_after=1 << 62, hnsw_m=m, hnsw_ef_construct=ef_construct)
        try:
            await store.create("scale", vectors.shape[1])
            await fill(store, vectors, chunk_texts)
            build = store.build("scale")
            for ef in sorted(set(TRADEOFF_EFS)):
                store.set_hnsw_ef(ef)
                latency: list[float] = []
                for _, vector, _ in embedded:
                    started = time.perf_counter()
                    await store.search("scale", vector, 4)
                    latency.append((time.perf_counter() - started) * 1000)
                recall = [
                    len({hit.point_id for hit in await store.search("scale", vector, 10)} & exact[n]) / 10
                    for n, (_, vector, _) in enumerate(embedded[:100])
                ]
                chosen = " <- default" if (m, ef_construct, ef) == (HNSW_M, HNSW_EF_CONSTRUCT, HNSW_EF) else ""
                print(
                    f"  {m:>4}{ef_construct:>14}{build['seconds']:>9.1f}{build['peak_mib']:>11.0f}{ef:>9}"
                    f"{pct(latency, 50):>9.2f}{pct(latency, 99):>9.2f}{float(np.mean(recall)):>11.3f}{chosen}"
                )
        finally:
            store.close()
            shutil.rmtree(folder, ignore_errors=True)


def truth(vectors: np.ndarray, query: list[float], k: int) -> set[str]:
    """The exact top k by cosine (the vectors are unit length): what recall is measured against."""
    scores = vectors @ (np.asarray(query, dtype=np.float32) / np.linalg.norm(query))
    return {point_id("scale", int(i)) for i in np.argpartition(-scores, k)[:k]}


def report(size: int, embed_ms: list[float], results: dict[str, dict[str, Any]]) -> None:
    labels = list(results)
    print(f"\n  {size:,} chunks{'':<30}" + "".join(f"{label:>22}" for label in labels))

    def line(name: str, values: list[str]) -> None:
        print(f"  {name:<40}" + "".join(f"{value:>22}" for value in values))

    for q in (50, 99):
        line(f"search P{q} (dense, ms)", [f"{pct(r['dense'], q):.2f}" for r in results.values()])
    for q in (50, 99):
        line(
            f"search P{q} (hybrid dense+BM25, ms)",
            [f"{pct(r['hybrid'], q):.2f}" if r["hybrid"] else "-" for r in results.values()],
        )
    for q in (50, 99):
        totals = [[e + s for e, s in zip(embed_ms, r["hybrid"] or r["dense"], strict=True)] for r in results.values()]
        line(f"embed + search P{q} (as served, ms)", [f"{pct(t, q):.2f}" for t in totals])
    for q in (50, 99):
        line(
            f"search P{q} from another process (socket, ms)",
            [f"{pct(r['other'], q):.2f}" if r["other"] else "-" for r in results.values()],
        )
    line("recall@10 against exact search", [f"{r['recall']:.3f}" for r in results.values()])
    line("fill (s)", [f"{r['fill']:.1f}" for r in results.values()])
    line(
        "index build (s, child process)",
        [f"{r['build']['seconds']:.1f}" if r["build"]["seconds"] else "none (scan)" for r in results.values()],
    )
    line(
        "index build peak memory (MiB, child)",
        [f"{r['build']['peak_mib']:.0f}" if r["build"]["peak_mib"] else "-" for r in results.values()],
    )
    line("memory held by the store (MiB, RSS)", [f"{r['rss']:.0f}" for r in results.values()])
    line("on disk (MiB)", [f"{r['disk']:.0f}" for r in results.values()])


async def main_async(args: argparse.Namespace) -> None:
    env, status, started = start_appliance(args.reuse)
    try:
        gateway = status["gateway_url"]
        engine = next(e["url"] for e in status["engines"] if e["model"] == EMBED_MODEL)
        key = api_key(env)
        rng = random.Random(3)
        documents = [document(n, 6, rng) for n in range(args.documents)]
        collection, texts = await ingestion(gateway, engine, key, documents)
        asked = queries(args.queries, rng)
        await query_latency(gateway, engine, key, collection, asked)
        await at_scale(engine, texts, asked, args.sizes, args.local_max, args.tradeoff)
    finally:
        if started:
            cli(env, "down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reuse", action="store_true", help="use the appliance already running (its env)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="collection sizes (e.g. 1000000)")
    parser.add_argument("--local-max", type=int, default=100_000, help="largest size local mode is run at")
    parser.add_argument("--tradeoff", action="store_true", help="the HNSW trade-off table at the first size")
    parser.add_argument("--socket-client", nargs=2, help=argparse.SUPPRESS)  # the second process's part
    args = parser.parse_args()
    if args.socket_client:
        socket_client(*args.socket_client)
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

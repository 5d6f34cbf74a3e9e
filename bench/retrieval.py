"""Retrieval: what it costs a request (embedding + search) at 10,000 and 100,000 chunks, and ingestion speed.

1. Ingestion through the appliance (`POST /v1/rag/collections/{id}/documents`: extract, chunk, embed on the
   real embedding engine, write to Qdrant local mode), in chunks per second, against the embedding engine
   alone fed the same chunk texts in the same batches (the floor ingestion cannot beat).
2. Query latency through the appliance (`POST /v1/rag/query`) on the ingested collection, against the
   embedding engine alone embedding the same queries (cache off: every query differs).
3. Embedding + search at 10,000 and 100,000 chunks: a Qdrant local-mode collection of this process is
   filled with the ingested chunks' real vectors, and up to the size with unit vectors drawn at random
   around them (search cost depends on the count and dimension of the vectors, not on where they came from;
   embedding 100,000 chunks on this CPU would take hours). Each query is embedded by the real engine and
   searched; P50/P99 of both parts are printed, and search time as a share of the total.

Usage: .venv/bin/python bench/retrieval.py [--documents 40] [--queries 200] [--reuse]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.retrieval.vectors import VectorStore, point_id  # noqa: E402
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


async def at_scale(engine: str, texts: list[str], asked: list[str], sizes: list[int]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench-qdrant-"))
    store = VectorStore(path=folder)
    rng = np.random.default_rng(7)
    try:
        async with aiohttp.ClientSession() as session:
            real: list[list[float]] = []
            for first in range(0, len(texts), 32):
                real.extend(await embed(session, engine, texts[first : first + 32]))
            base = np.asarray(real, dtype=np.float32)
            await store.create("scale", base.shape[1])
            filled = 0
            print("\n3. Embedding + search in Qdrant local mode (this process), by collection size")
            for size in sizes:
                started = time.perf_counter()
                while filled < size:
                    count = min(2000, size - filled)
                    if filled < len(base):
                        vectors = base[filled : filled + count]
                    else:
                        around = base[rng.integers(0, len(base), count)]
                        vectors = around + rng.normal(0, 0.05, around.shape).astype(np.float32)
                    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
                    ids = [point_id("scale", filled + i) for i in range(len(vectors))]
                    payloads: list[dict[str, Any]] = [
                        {"document_id": "scale", "chunk_index": filled + i} for i in range(len(vectors))
                    ]
                    await store.upsert("scale", ids, vectors.tolist(), payloads)
                    filled += len(vectors)
                fill_s = time.perf_counter() - started
                embed_ms: list[float] = []
                search_ms: list[float] = []
                for query in asked:
                    started = time.perf_counter()
                    vector = (await embed(session, engine, [f"{query} ({size})"]))[0]
                    embedded = time.perf_counter()
                    await store.search("scale", vector, 4)
                    search_ms.append((time.perf_counter() - embedded) * 1000)
                    embed_ms.append((embedded - started) * 1000)
                total = [e + s for e, s in zip(embed_ms, search_ms, strict=True)]
                print(f"  {size:>7,} chunks (filled in {fill_s:.0f} s)")
                print(row("embed", embed_ms))
                print(row("search (top 4)", search_ms))
                print(row("embed + search", total))
                print(f"  search share of the total at P50: {pct(search_ms, 50) / pct(total, 50):.0%}")
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)


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
        await at_scale(engine, texts, asked, [10_000, 100_000])
    finally:
        if started:
            cli(env, "down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--reuse", action="store_true", help="use the appliance already running (its env)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

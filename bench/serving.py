"""Serving under a mixed load: short interactive requests beside long-context ones, straight to the vLLM
engine and through the appliance (admission tiers on), in the same run with the same arrival schedule.

Open-loop Poisson arrivals (the generator never waits for answers): `--short-rate` short requests/s (a
one-line question, 16 output tokens) and `--long-rate` long requests/s (a ~1,000-token prompt, 48 output
tokens), for `--seconds`, all streamed so time to first token (TTFT) is measured at the client. Prints, for
each path, P50/P99 TTFT of short and of long requests and the throughput (requests and output tokens per
second of the run), then the ratios the goal is stated in: short P99 through the appliance over direct,
throughput ratio, long P99 ratio.

Usage: .venv/bin/python bench/serving.py [--seconds 60] [--short-rate 2] [--long-rate 0.5] [--reuse]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import CHAT_MODEL, api_key, cli, pct, start_appliance  # noqa: E402

SHORT_QUESTION = "What is the capital of France? Answer in one sentence."
LONG_DOCUMENT = " ".join(f"Line {n}: the quarterly report lists shipments, delays and costs." for n in range(75))


@dataclass
class Result:
    ttft: dict[str, list[float]] = field(default_factory=lambda: {"short": [], "long": []})
    tokens: int = 0
    completed: int = 0
    errors: int = 0
    elapsed: float = 0.0


def schedule(seconds: float, short_rate: float, long_rate: float, seed: int = 11) -> list[tuple[float, str]]:
    """Arrival times of both kinds, merged: the same for both paths."""
    rng = random.Random(seed)
    arrivals: list[tuple[float, str]] = []
    for kind, rate in (("short", short_rate), ("long", long_rate)):
        at = rng.expovariate(rate)
        while at < seconds:
            arrivals.append((at, kind))
            at += rng.expovariate(rate)
    return sorted(arrivals)


async def one(session: aiohttp.ClientSession, url: str, kind: str, index: int, result: Result, run: str) -> None:
    # Every prompt of a run starts with the run's id: a later run cannot reuse an earlier run's prefix cache.
    text = f"[{run}] " + (SHORT_QUESTION if kind == "short" else f"Report {index}. {LONG_DOCUMENT}\nSummarise it.")
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16 if kind == "short" else 48,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if response.status != 200:
                result.errors += 1
                return
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    result.tokens += chunk["usage"]["completion_tokens"]
    except aiohttp.ClientError:
        result.errors += 1
        return
    if first is not None:
        result.ttft[kind].append(first * 1000)
    result.completed += 1


async def run(url: str, key: str | None, arrivals: list[tuple[float, str]]) -> Result:
    result = Result()
    run_id = uuid.uuid4().hex[:8]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        started = time.perf_counter()
        for index, (at, kind) in enumerate(arrivals):
            delay = started + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, url, kind, index, result, run_id)))
        await asyncio.gather(*tasks)
        result.elapsed = time.perf_counter() - started
    return result


def report(label: str, result: Result) -> None:
    for kind in ("short", "long"):
        values = result.ttft[kind]
        if values:
            print(
                f"  {label:<10} {kind:<5} TTFT n={len(values):<4} "
                f"P50 {pct(values, 50):8.1f} ms   P99 {pct(values, 99):8.1f} ms"
            )
    print(
        f"  {label:<10} throughput {result.completed / result.elapsed:.3f} req/s, "
        f"{result.tokens / result.elapsed:.1f} output tokens/s, {result.errors} errors, {result.elapsed:.0f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--short-rate", type=float, default=2.0)
    parser.add_argument("--long-rate", type=float, default=0.5)
    parser.add_argument("--reuse", action="store_true", help="use the appliance already up (default ports)")
    args = parser.parse_args()
    env, status, started = start_appliance(args.reuse)
    try:
        engine = next(e["url"] for e in status["engines"] if e["model"] == CHAT_MODEL)
        key = api_key(env)
        arrivals = schedule(args.seconds, args.short_rate, args.long_rate)
        warm = schedule(15.0, args.short_rate, args.long_rate, seed=3)  # compiles the engine's batch shapes
        asyncio.run(run(engine, None, warm))
        asyncio.run(run(status["gateway_url"], key, warm))
        print(
            f"\n{len(arrivals)} arrivals over {args.seconds:.0f}s ({args.short_rate}/s short, {args.long_rate}/s long)"
        )
        direct = asyncio.run(run(engine, None, arrivals))
        report("direct", direct)
        through = asyncio.run(run(status["gateway_url"], key, arrivals))
        report("appliance", through)
        short_ratio = pct(through.ttft["short"], 99) / pct(direct.ttft["short"], 99)
        long_ratio = pct(through.ttft["long"], 99) / pct(direct.ttft["long"], 99)
        throughput_ratio = (through.tokens / through.elapsed) / (direct.tokens / direct.elapsed)
        print(
            f"  short P99 TTFT appliance/direct {short_ratio:.2f} (goal <= 0.5); "
            f"throughput ratio {throughput_ratio:.2f} (goal >= 0.9); long P99 ratio {long_ratio:.2f} (goal <= 2)"
        )
    finally:
        if started:
            cli(env, "down")


if __name__ == "__main__":
    main()

"""Gateway overhead, measured against a baseline in the same run.

Part 1 (real engine): the same request mix (chat non-streamed, chat streamed, embeddings) is sent to the
vLLM CPU engine directly and through the gateway, interleaved request by request so drift hits both
alike; prints P50/P99 latency of both, the added latency and the ratio. Streamed requests also report
time to first token.

Part 2 (the gateway's own cost at high request rates): a fast in-process OpenAI-shaped upstream (the fake
engine of tests/support, in a process of its own) is hit with open-loop Poisson arrivals, directly and
through the gateway (uvicorn, one worker), at rising rates; prints P50/P99 and achieved throughput.

Usage: .venv/bin/python bench/gateway_overhead.py [--requests 60] [--rates 250,500,1000] [--reuse]
    [--skip-engine] [--workers 1,2] [--variants journal,journal+fsync,commit] [--system-chars 2400]
(--reuse: use an appliance already up on the default ports instead of starting one for the benchmark;
--variants: how answers' records are made durable, README "Audit": journal, journal with fdatasync, or the
answer waiting for the database commit as before the journals).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.fake_engine import free_port  # noqa: E402

CHAT_MODEL, EMBED_MODEL = "smollm2-135m-instruct", "minilm-l6-v2"
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def row(label: str, values: list[float]) -> str:
    return f"  {label:<34} n={len(values):<5} P50 {pct(values, 50):8.2f} ms   P99 {pct(values, 99):8.2f} ms"


# -- part 1: the real engine --------------------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True)


def start_appliance(reuse: bool) -> tuple[dict[str, str], dict[str, Any], bool]:
    env = dict(os.environ)
    if not reuse:
        env.update(
            APPLIANCE_DATA_DIR=str(ROOT / "var" / "bench"),
            APPLIANCE_MODELS_CACHE_DIR=str(ROOT / "var" / "models"),
            APPLIANCE_SERVER__PORT="28080",
            APPLIANCE_ENGINES__PORT_BASE="28101",
        )
        started = time.monotonic()
        result = cli(env, "up", "--detach")
        if result.returncode != 0:
            sys.exit(f"appliance up failed:\n{result.stdout}\n{result.stderr}")
        print(f"appliance started for the benchmark in {time.monotonic() - started:.0f}s")
    status = json.loads(cli(env, "status", "--json").stdout)
    if not status["healthy"]:
        sys.exit("the appliance is not healthy")
    return env, status, not reuse


def api_key(env: dict[str, str]) -> str:
    """An inference key for the benchmark's own tenant (the gateway authenticates every /v1 call)."""
    result = cli(env, "admin", "create-key", "--tenant", "bench", "--workflow", "bench", "--create")
    if result.returncode != 0:
        sys.exit(f"creating an API key failed: {result.stderr}")
    return str(json.loads(result.stdout)["key"])


async def timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[float, float | None]:
    """(total ms, time to first data event ms or None)."""
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url, json=body) as response:
        assert response.status == 200, await response.text()
        if body.get("stream"):
            async for line in response.content:
                if first is None and line.startswith(b"data:"):
                    first = (time.perf_counter() - started) * 1000
        else:
            await response.read()
    return (time.perf_counter() - started) * 1000, first


async def part1(gateway: str, engines: dict[str, str], requests: int, key: str) -> None:
    mix = [
        ("chat", "/v1/chat/completions", CHAT_MODEL, {"messages": QUESTION, "max_tokens": 16, "temperature": 0}),
        (
            "chat stream",
            "/v1/chat/completions",
            CHAT_MODEL,
            {"messages": QUESTION, "max_tokens": 16, "temperature": 0, "stream": True},
        ),
        ("embeddings", "/v1/embeddings", EMBED_MODEL, {"input": ["a short sentence to embed"] * 4}),
    ]
    results: dict[tuple[str, str], list[float]] = {}
    ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for _name, path, model, extra in mix:  # warm-up
            for base in (engines[model], gateway):
                await timed(session, base + path, {"model": model, **extra})
        for index in range(requests):
            name, path, model, extra = mix[index % len(mix)]
            order = [("direct", engines[model]), ("gateway", gateway)]
            if index % 2:
                order.reverse()
            for via, base in order:
                total, first = await timed(session, base + path, {"model": model, **extra})
                results.setdefault((name, via), []).append(total)
                if first is not None:
                    ttft[via].append(first)
    print("\nPart 1: real vLLM CPU engine, closed loop (one request at a time), interleaved")
    for name, *_ in mix:
        direct, through = results[(name, "direct")], results[(name, "gateway")]
        print(row(f"{name}: direct", direct))
        print(row(f"{name}: through gateway", through))
        # Each request went both ways back to back: the per-pair difference cancels the engine's own
        # variation (its latency is bimodal under CPU contention), which a difference of P50s does not.
        paired = [t - d for d, t in zip(direct, through, strict=True)]
        print(
            f"  {name}: gateway adds (paired) median {pct(paired, 50):+.2f} ms, P90 {pct(paired, 90):+.2f} ms; "
            f"P50 ratio {pct(through, 50) / pct(direct, 50):.3f}, P99 ratio {pct(through, 99) / pct(direct, 99):.3f}"
        )
    print(row("stream TTFT: direct", ttft["direct"]))
    print(row("stream TTFT: through gateway", ttft["gateway"]))


# -- part 2: the gateway's own cost --------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("ab") as handle:
        return subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT)


MODEL_FILES = ROOT / "var" / "models" / CHAT_MODEL  # what the fake model counts with (make setup prepares it)


def spawn_fake(port: int) -> subprocess.Popen[bytes]:
    """The fake engine in a process of its own (it must not share the benchmark's CPU time slices). It counts
    prompts with smollm2's tokenizer and chat template, as vLLM would for that model, so the gateway counts plain
    chats itself as it does for a real model."""
    code = "from tests.support.fake_engine import serve_forever; serve_forever({}, model_folder={!r})"
    code = code.format(port, str(MODEL_FILES))
    return spawn([sys.executable, "-c", code])


def spawn_gateway(port: int, env: dict[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """The gateway as a node runs it (`appliance serve`: migrations once, then its worker processes)."""
    env = dict(env, APPLIANCE_SERVER__PORT=str(port), APPLIANCE_SERVER__LOG_LEVEL="warning")
    return spawn([sys.executable, "-m", "appliance.cli", "serve"], env, log)


PASSTHROUGH = """
import sys
from aiohttp import ClientSession, TCPConnector, web

async def forward(request):
    body = await request.read()
    async with request.app["client"].post(request.app["upstream"] + request.path, data=body,
                                          headers={"Content-Type": "application/json"}) as upstream:
        return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")

async def client(app):
    app["client"] = ClientSession(connector=TCPConnector(limit=0))
    yield
    await app["client"].close()

app = web.Application()
app["upstream"] = sys.argv[2]
app.router.add_post("/v1/chat/completions", forward)
app.cleanup_ctx.append(client)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def spawn_passthrough(port: int, upstream: str) -> subprocess.Popen[bytes]:
    """The floor: a bare aiohttp pass-through (no auth, no parsing, no bookkeeping), in a process of its own."""
    return spawn([sys.executable, "-c", PASSTHROUGH, str(port), upstream])


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            try:
                async with session.get(url) as response:
                    if response.status in (200, 405):
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def chat_body(system: str, n: int) -> bytes:
    """The chat sent: "hi"; with ``system``, that system prompt (the same in every request, as an agent's
    instructions) and a question of its own in each request."""
    if not system:
        return json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {n}: what next?"}]
    return json.dumps({"model": "fake", "messages": messages, "max_tokens": 4}).encode()


async def poisson(url: str, rate: float, seconds: float, key: str, system: str = "") -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession, body: bytes) -> None:
        nonlocal errors
        started = time.perf_counter()
        try:
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    return
        except aiohttp.ClientError:
            errors += 1
            return
        latencies.append((time.perf_counter() - started) * 1000)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        started = time.perf_counter()
        next_at = started
        while next_at - started < seconds:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, chat_body(system, len(tasks)))))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
    return latencies, errors, len(latencies) / elapsed


SYSTEM_SENTENCE = "You are the finance team's agent: answer from the ledger, cite the entries you used. "
LARGE = 10**12  # budgets that never run out: the benchmark measures their cost, not refusals


def bench_keys(env: dict[str, str], gateway: str) -> tuple[str, str]:
    """(a key whose chain has no budget, a key with six budgets on its chain: one on the key, one on its agent,
    one on its workflow, three on its tenant; tokens, requests, cost and a per-request cap)."""
    free = json.loads(cli(env, "admin", "create-key", "--tenant", "bench", "--workflow", "free", "--create").stdout)
    held = json.loads(
        cli(env, "admin", "create-key", "--tenant", "bench", "--workflow", "held", "--agent", "a", "--create").stdout
    )
    admin = cli(env, "admin", "token", "--role", "admin").stdout.strip()
    budgets = [
        ("api_key", held["id"], "requests", LARGE, "minute"),
        ("agent", held["agent_id"], "tokens", LARGE, "hour"),
        ("workflow", held["workflow_id"], "cost", 10**8, "month"),
        ("tenant", held["tenant_id"], "tokens", LARGE, "day"),
        ("tenant", held["tenant_id"], "requests", LARGE, "month"),
        ("tenant", held["tenant_id"], "max_tokens", 4096, "none"),
    ]

    async def create() -> None:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
            for scope_type, scope_id, kind, limit, period in budgets:
                body = {"scope_type": scope_type, "scope_id": scope_id, "kind": kind, "limit": limit, "period": period}
                async with session.post(gateway + "/admin/budgets/", json=body) as response:
                    assert response.status == 201, await response.text()

    asyncio.run(create())
    return str(free["key"]), str(held["key"])


def report(
    rate: float, label: str, result: tuple[list[float], int, float], direct: tuple[list[float], int, float]
) -> None:
    latencies, errors, throughput = result
    if not latencies:
        print(f"  {rate:>5.0f} req/s {label:<30} no answer, {errors} errors")
        return
    added50 = pct(latencies, 50) - pct(direct[0], 50)
    added99 = pct(latencies, 99) - pct(direct[0], 99)
    extra = (
        ""
        if label == "direct"
        else f"   adds P50 {added50:+7.2f} / P99 {added99:+8.2f} ms, x{throughput / direct[2]:.3f}"
    )
    print(row(f"{rate:.0f} req/s {label}", latencies) + f"  {throughput:5.0f} req/s, {errors:>4} errors" + extra)


async def part2_rates(targets: dict[str, tuple[str, str]], rates: list[float], seconds: float, system: str) -> None:
    for url, key in targets.values():  # warm-up
        await poisson(url, 100, 1.0, key, system)
    for rate in rates:
        results = {label: await poisson(url, rate, seconds, key, system) for label, (url, key) in targets.items()}
        for label, result in results.items():
            report(rate, label, result, results["direct"])


VARIANTS = {  # how an answer's records are made durable before it is released (README, audit)
    "journal": {},
    "journal+fsync": {"APPLIANCE_JOURNAL__FSYNC": "true"},
    "commit": {"APPLIANCE_JOURNAL__ENABLED": "false"},
}


def part2(rates: list[float], seconds: float, workers: list[int], variants: list[str], system: str = "") -> None:
    fake_port, floor_port = free_port(), free_port()
    fake = spawn_fake(fake_port)
    floor = spawn_passthrough(floor_port, f"http://127.0.0.1:{fake_port}")
    fake_url, floor_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{floor_port}"
    asyncio.run(wait_up(fake_url + "/health"))
    asyncio.run(wait_up(floor_url + "/v1/chat/completions"))
    print(
        f"\nPart 2: fast fake upstream (tests/support/fake_engine.py), open-loop Poisson, {seconds:.0f}s per run;"
        " auth on every request, admission tiers and the audit log on"
    )
    runs = [(count, variants[0]) for count in workers] + [(workers[0], variant) for variant in variants[1:]]
    try:
        for count, variant in runs:
            data_dir = ROOT / "var" / f"bench-overhead-{count}"
            shutil.rmtree(data_dir, ignore_errors=True)
            (data_dir / "models").mkdir(parents=True)
            (data_dir / "models" / "fake").symlink_to(MODEL_FILES)  # the gateway counts with the model's files
            env = dict(
                os.environ,
                **VARIANTS[variant],
                APPLIANCE_DATA_DIR=str(data_dir),
                APPLIANCE_SERVER__WORKERS=str(count),
                APPLIANCE_GATEWAY__ROUTES=json.dumps([{"model": "fake", "url": fake_url}]),
                APPLIANCE_PRICING__MODELS=json.dumps(
                    {"fake": {"prompt_per_million": 0.2, "completion_per_million": 0.8}}
                ),
            )
            port = free_port()
            env["APPLIANCE_SERVER__PORT"] = str(port)  # the issuer of the admin token names it
            cli(env, "admin", "token", "--role", "admin")  # schema and secrets, before the gateway starts
            gateway_url = f"http://127.0.0.1:{port}"
            gateway = spawn_gateway(port, env, data_dir / "gateway.log")
            try:
                asyncio.run(wait_up(gateway_url + "/healthz"))
                free, held = bench_keys(env, gateway_url)
                print(f"\n  gateway with {count} worker process(es), records made durable by: {variant}")
                targets = {
                    "direct": (fake_url + "/v1/chat/completions", free),
                    "bare pass-through": (floor_url + "/v1/chat/completions", free),
                    "appliance, no budget": (gateway_url + "/v1/chat/completions", free),
                    "appliance, 6 budgets": (gateway_url + "/v1/chat/completions", held),
                }
                asyncio.run(part2_rates(targets, rates, seconds, system))
            finally:
                stop(gateway)
    finally:
        for process in (floor, fake):
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)  # a saturated gateway drains its backlog before it exits
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150, help="requests in part 1 (split over the mix)")
    parser.add_argument("--rates", default="50,150,500", help="request rates for part 2")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", default="1,2", help="gateway worker processes in part 2, one run each")
    parser.add_argument(
        "--variants",
        default="journal",
        help=f"how answers' records are made durable ({', '.join(VARIANTS)}); the first with every worker count, "
        "the others with the first count",
    )
    parser.add_argument("--reuse", action="store_true", help="use the appliance already up (default ports)")
    parser.add_argument("--skip-engine", action="store_true", help="only part 2")
    parser.add_argument(
        "--system-chars",
        type=int,
        default=0,
        help="part 2 sends a system prompt of this many characters, the same in every request (an agent's), "
        "and a question of its own in each (default: one 'hi')",
    )
    args = parser.parse_args()
    if not args.skip_engine:
        env, status, started = start_appliance(args.reuse)
        try:
            engines = {e["model"]: e["url"] for e in status["engines"]}
            asyncio.run(part1(status["gateway_url"], engines, args.requests, api_key(env)))
        finally:
            if started:
                cli(env, "down")
    part2(
        [float(r) for r in args.rates.split(",")],
        args.seconds,
        [int(n) for n in args.workers.split(",")],
        args.variants.split(","),
        SYSTEM_SENTENCE * (args.system_chars // len(SYSTEM_SENTENCE)),
    )


if __name__ == "__main__":
    main()

"""Floods: does the appliance keep answering other tenants while one client floods it?

The gateway runs as a node runs it (`appliance serve`, its default workers) in front of the fast fake engine
(tests/support/fake_engine.py, in a process of its own), so that what is measured is the gateway, not the
engine. A victim tenant sends chat completions at a steady open-loop Poisson rate; its latency is measured
with no flood first (the baseline), then while each flood runs, then with no flood again, all in the same run:

- sign-in: POST /oidc/authorize with random usernames and wrong passwords (limits per address and overall,
  checked before any password is hashed; hashing on its own small pool);
- unknown keys: chat completions with well-formed API keys nobody holds (401; refusals of requests that name
  nobody are digested in the audit log, a few recorded one by one per address, the rest counted);
- uploads: another tenant uploads ~200 KB text documents as fast as it can (per-tenant ingestion limit,
  extraction on its own pool);
- oversized: bodies past server.max_body_bytes on /v1 and /admin (413 before the body is read in full);
- nested JSON: megabyte bodies of ``[[[[...`` on /v1 and /admin (400 json_too_deep).

Prints, per phase, the victim's P50/P99 and their ratio to the baseline, its errors, and what the flood got
back (statuses). Every flood comes from one address (loopback): the per-address sign-in limit answers first.

Usage: .venv/bin/python bench/floods.py [--seconds 10] [--rate 20] [--flooders 32] [--floods sign-in,uploads,...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.fake_engine import free_port  # noqa: E402

EMBED_MODEL = "minilm-l6-v2"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"`appliance {' '.join(args)}` failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def spawn(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with log.open("ab") as handle:
        return subprocess.Popen(args, env=env, stdout=handle, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def wait_up(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(1200):
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


# -- the victim ----------------------------------------------------------------------------------------------


async def victim(url: str, key: str, rate: float, seconds: float, seed: int) -> tuple[list[float], Counter[str]]:
    """Open-loop Poisson chat completions of the victim tenant: latencies (ms) of the answered, and errors."""
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    rng = random.Random(seed)

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        try:
            async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors[str(response.status)] += 1
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors[type(exc).__name__] += 1
            return
        latencies.append((time.perf_counter() - started) * 1000)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        tasks = []
        started = time.perf_counter()
        next_at = started
        while next_at - started < seconds:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session)))
            next_at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return latencies, errors


# -- the floods ----------------------------------------------------------------------------------------------

Flood = Callable[[aiohttp.ClientSession, random.Random], Awaitable[int]]


def sign_in_flood(redirect: str) -> Flood:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()

    async def attempt(session: aiohttp.ClientSession, rng: random.Random) -> int:
        form = {
            "client_id": "appliance-console",
            "redirect_uri": redirect,
            "response_type": "code",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": "flood",
            "username": f"user{rng.getrandbits(40):x}",
            "password": secrets.token_hex(8),
        }
        async with session.post("/oidc/authorize", data=form, allow_redirects=False) as response:
            await response.read()
            return response.status

    return attempt


def bad_key_flood() -> Flood:
    body = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()

    async def send(session: aiohttp.ClientSession, rng: random.Random) -> int:
        key = f"apk_{rng.getrandbits(80):020x}_{secrets.token_urlsafe(32)}"  # well-formed, held by nobody
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with session.post("/v1/chat/completions", data=body, headers=headers) as response:
            await response.read()
            return response.status

    return send


def upload_flood(key: str, collection: str) -> Flood:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "text/plain"}
    words = "valve turbine coolant sensor relay breaker transformer pump filter bearing rotor winding".split()

    async def upload(session: aiohttp.ClientSession, rng: random.Random) -> int:
        text = " ".join(rng.choice(words) for _ in range(30_000))  # ~200 KB, ~150 chunks
        path = f"/v1/rag/collections/{collection}/documents?name=flood.txt"
        async with session.post(path, data=text.encode(), headers=headers) as response:
            await response.read()
            return response.status

    return upload


def oversized_flood(key: str, admin: str, limit: int) -> Flood:
    body = b'{"model":"fake","messages":[{"role":"user","content":"' + b"x" * (limit + 1024) + b'"}]}'

    async def send(session: aiohttp.ClientSession, rng: random.Random) -> int:
        path, token = rng.choice((("/v1/chat/completions", key), ("/admin/tenants", admin)))
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        try:
            async with session.post(path, data=body, headers=headers) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError:
            return 0  # the server may close the connection once it has answered 413 mid-body

    return send


def nested_flood(key: str, admin: str, size: int) -> Flood:
    depth = size // 2
    body = b'{"model":"fake","messages":' + b"[" * depth + b"]" * depth + b"}"

    async def send(session: aiohttp.ClientSession, rng: random.Random) -> int:
        path, token = rng.choice((("/v1/chat/completions", key), ("/admin/tenants", admin)))
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with session.post(path, data=body, headers=headers) as response:
            await response.read()
            return response.status

    return send


async def flooding(url: str, flood: Flood, flooders: int, stop: asyncio.Event) -> Counter[str]:
    statuses: Counter[str] = Counter()

    async def loop(seed: int) -> None:
        rng = random.Random(seed)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
            while not stop.is_set():
                try:
                    statuses[str(await flood(s, rng))] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

    await asyncio.gather(*(loop(n) for n in range(flooders)))
    return statuses


# -- the run ---------------------------------------------------------------------------------------------------


def make_flood(name: str, url: str, keys: dict[str, str], max_body: int) -> Flood:
    if name == "sign-in":
        return sign_in_flood(f"{url}/console/callback")
    if name == "bad-keys":
        return bad_key_flood()
    if name == "uploads":
        return upload_flood(keys["flooder"], keys["collection"])
    if name == "oversized":
        return oversized_flood(keys["flooder"], keys["admin"], max_body)
    return nested_flood(keys["flooder"], keys["admin"], 1024 * 1024)


async def flood_process(args: argparse.Namespace) -> None:
    """``--flood``: one flood, in a process of its own (the victim's measurements must not share its event loop),
    until SIGTERM; then what it got back, as JSON on standard output."""
    keys = json.loads(args.keys)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    flood = make_flood(args.flood, args.url, keys, args.max_body)
    print(json.dumps(await flooding(args.url, flood, args.flooders, stop)), flush=True)


FLOODS = [
    ("no flood (baseline)", None),
    ("sign-in, random usernames", "sign-in"),
    ("unknown API keys on /v1", "bad-keys"),
    ("uploads of 200 KB documents", "uploads"),
    ("oversized bodies (/v1, /admin)", "oversized"),
    ("nested JSON, 1 MB (/v1, /admin)", "nested"),
    ("no flood (after)", None),
]


async def phases(args: argparse.Namespace, url: str, env: dict[str, str]) -> None:
    admin = cli(env, "admin", "token", "--role", "admin").strip()
    made = json.loads(cli(env, "admin", "create-key", "--tenant", "victim", "--workflow", "chat", "--create"))
    victim_key = str(made["key"])
    made = json.loads(cli(env, "admin", "create-key", "--tenant", "flooder", "--workflow", "flood", "--create"))
    flooder_key = str(made["key"])
    async with (
        aiohttp.ClientSession(url) as session,
        session.post(
            "/v1/rag/collections", json={"name": "flood"}, headers={"Authorization": f"Bearer {flooder_key}"}
        ) as response,
    ):
        assert response.status == 201, await response.text()
        collection = (await response.json())["id"]
    keys = json.dumps({"admin": admin, "flooder": flooder_key, "collection": collection})
    await victim(url, victim_key, args.rate, 2.0, 0)  # warm-up
    print(
        f"\nVictim: chat completions of another tenant, open-loop Poisson {args.rate:g}/s for {args.seconds:g}s "
        f"per phase; each flood from a process of its own, {args.flooders} concurrent connections\n"
    )
    header = f"  {'phase':<34} {'n':>5} {'P50 ms':>8} {'P99 ms':>8} {'x P50':>7} {'x P99':>7} {'errors':>7}  flood got"
    print(header)
    base: tuple[float, float] | None = None
    chosen = [(name, flood) for name, flood in FLOODS if flood is None or flood in args.floods.split(",")]
    for index, (name, flood) in enumerate(chosen):
        child = None
        if flood is not None:
            command = [sys.executable, __file__, "--flood", flood, "--url", url, "--keys", keys]
            command += ["--flooders", str(args.flooders), "--max-body", str(args.max_body)]
            child = subprocess.Popen(command, stdout=subprocess.PIPE)
            await asyncio.sleep(2.0)  # the flood is under way before the victim is measured
        latencies, errors = await victim(url, victim_key, args.rate, args.seconds, index + 1)
        statuses: dict[str, int] = {}
        if child is not None:
            child.send_signal(signal.SIGTERM)
            out, _ = await asyncio.to_thread(child.communicate)
            statuses = json.loads(out or b"{}")
        p50, p99 = pct(latencies, 50), pct(latencies, 99)
        if base is None:
            base = (p50, p99)
        got = ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items(), key=lambda i: -i[1]))
        print(
            f"  {name:<34} {len(latencies):>5} {p50:>8.1f} {p99:>8.1f} {p50 / base[0]:>7.2f} {p99 / base[1]:>7.2f} "
            f"{sum(errors.values()):>7}  {got or '-'}",
            flush=True,
        )
        if errors:
            print(f"  {'':<34} victim errors: {dict(errors)}")
        await asyncio.sleep(3.0)  # let what the flood left in flight drain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="victim measurement per phase")
    parser.add_argument("--rate", type=float, default=20.0, help="victim requests per second")
    parser.add_argument("--flooders", type=int, default=32, help="concurrent flood connections")
    parser.add_argument(
        "--floods", default="sign-in,bad-keys,uploads,oversized,nested", help="which floods, in that order"
    )
    parser.add_argument("--max-body", type=int, default=4 * 1024 * 1024, help="server.max_body_bytes")
    parser.add_argument("--flood", help=argparse.SUPPRESS)  # the child that floods
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood:
        asyncio.run(flood_process(args))
        return
    data_dir = ROOT / "var" / "bench-floods"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    fake_port, port = free_port(), free_port()
    fake_url, url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{port}"
    fake = spawn(
        [sys.executable, "-c", f"from tests.support.fake_engine import serve_forever; serve_forever({fake_port})"]
    )
    routes = [{"model": "fake", "url": fake_url}, {"model": EMBED_MODEL, "url": fake_url, "runner": "pooling"}]
    env = dict(
        os.environ,
        APPLIANCE_DATA_DIR=str(data_dir),
        APPLIANCE_MODELS_CACHE_DIR=str(ROOT / "var" / "models"),  # the embedding model's tokenizer chunks
        APPLIANCE_SERVER__PORT=str(port),
        APPLIANCE_SERVER__MAX_BODY_BYTES=str(args.max_body),
        APPLIANCE_SERVER__LOG_LEVEL="warning",
        APPLIANCE_GATEWAY__ROUTES=json.dumps(routes),
        APPLIANCE_CONFIG=str(data_dir / "none.toml"),
    )
    cli(env, "admin", "token", "--role", "admin")  # schema and secrets, before the gateway starts
    gateway = spawn([sys.executable, "-m", "appliance.cli", "serve"], env, data_dir / "gateway.log")
    try:
        asyncio.run(wait_up(fake_url + "/health"))
        asyncio.run(wait_up(url + "/healthz"))
        asyncio.run(phases(args, url, env))
    finally:
        stop(gateway)
        stop(fake)


if __name__ == "__main__":
    main()

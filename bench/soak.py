"""Soak: mixed load on the real vLLM CPU engines for a long while, with the appliance's memory watched.

The appliance is started as a user starts it (`appliance up --detach`, a data directory and ports of its own).
Two tenants, each with a tokens budget and a requests budget, then a closed loop of workers sending a mix:
chat, streamed chat read to the end, streams left mid-way (the client disconnects), embeddings, RAG uploads
(the oldest documents deleted again so the store stays the same size) and queries, and admin calls (tenants,
usage, budgets, audit records). `--prime-minutes` opens the warm-up with the largest embedding batches (16-64
inputs of up to 150 words): before embedding engines kept at most 8 oneDNN primitives, their worker climbed toward
a high-water mark set by the batch shapes it had met, and priming reached it before the verdict's first window.
Since, the worker stays flat without it (2026-12-02: 802.4 to 802.3 MiB over 30 minutes), so the default is 0:
the soak measures the appliance as it starts. The resident memory (RSS) of every process
under the supervisor (supervisor, gateway and its workers, engines and their engine-core processes) is sampled
throughout. Each process's figures show its anonymous memory (its heap: what a leak grows) apart from its
mapped files (libraries, and in the gateway the vector store's segments and write-ahead log, written in 32 MiB files
that count in RSS as their pages are touched: page cache the kernel can take back), and the pages of the vector
store's own files apart. A gateway worker's document process (replaced every 200 documents) is judged as one
process, whichever child holds the role; none may be left once the appliance is down. The vector store's index
builds (a child process for the length of one build) are not sampled.

Pass, printed with the figures at the end:
- memory flat: for each process, the median RSS less the pages of the vector store's own files, over the last
  tenth of the run, is within 10 % of the median over the tenth right after the warm-up (and the total
  likewise). The store's pages grow with what is written until its log is cut (see ``memory_verdict``): they
  are printed, with the whole RSS, but not judged;
- no unexpected error (every answer has its expected status; left streams are counted apart);
- `appliance audit verify` passes;
- the ledger equals the budgets: per tenant, the tokens and requests its budgets used equal the ledger's
  totals for it over the run.

Not part of CI. Usage (it uses the engines' ports: run it alone, e.g. under the integration lock):
    flock /tmp/integration.lock .venv/bin/python bench/soak.py [--minutes 30] [--warmup-minutes 5] [--workers 3]
        [--without 'rag upload,rag query']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CHAT_MODEL, EMBED_MODEL = "smollm2-135m-instruct", "minilm-l6-v2"
LARGE = 10**12  # budgets that never run out: the soak checks their books, not refusals
KEPT_DOCUMENTS = 6  # RAG documents kept per collection; older ones are deleted as new ones arrive
WORDS = (
    "reactor valve pressure turbine coolant sensor relay circuit breaker transformer pump filter gasket "
    "bearing shaft rotor stator winding insulation fuse switch panel meter cable conduit ground neutral"
).split()


def cli(env: dict[str, str], *args: str, timeout: float = 1600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    if result.returncode != 0:
        sys.exit(f"`appliance` failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


# -- memory --------------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


DOCUMENT_PROCESS = b"appliance.retrieval.documents"  # a gateway worker's, replaced every 200 documents
INDEX_BUILD = b"edge_build.py"  # the vector store's index build: a child for the build's length, then gone


def _describe(pid: int, store: str) -> tuple[str, int, int, int, bool] | None:
    """(a readable name, RSS in bytes, its anonymous part, the part that is pages of the vector store's own files
    under ``store``, whether it is a helper process of its parent), or None once gone."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {line.split(":", 1)[0]: line.split()[1:2] for line in status.splitlines() if ":" in line}
    rss, anon = (int((fields.get(key) or ["0"])[0]) * 1024 for key in ("VmRSS", "RssAnon"))
    words = [a.decode(errors="replace") for a in argv if a]
    name = Path(words[0]).name if words else "?"
    for marker in ("--served-model-name", "--port"):
        if marker in words and words.index(marker) + 1 < len(words):
            name += f" {marker.lstrip('-')}={words[words.index(marker) + 1]}"
    if "appliance.cli" in words:
        name += " appliance " + " ".join(words[words.index("appliance.cli") + 1 :][:1])
    comm = next((line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Name:")), "")
    helper = any(DOCUMENT_PROCESS in part for part in argv)
    mapped = _store_pages(pid, store) if "appliance.cli" in words else 0  # only the gateway maps the store
    return f"{name} [{comm}]", rss, anon, mapped, helper


def _store_pages(pid: int, store: str) -> int:
    """Bytes of ``pid``'s RSS that are pages of files under ``store`` (the vector store's segments and WAL)."""
    total, counting = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            for line in smaps:
                first = line.split(None, 1)[0]
                if not first.endswith(":"):  # a mapping's header: address range, perms, offset, dev, inode, path
                    parts = line.split(None, 5)
                    counting = len(parts) == 6 and parts[5].startswith(store + "/")
                elif counting and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def _is_index_build(pid: int) -> bool:
    try:
        return any(part.endswith(INDEX_BUILD) for part in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
    except OSError:
        return False


Entry = tuple[str, int, int, int]  # name, RSS, anonymous, the vector store's file pages (bytes)


def sample_tree(root: int, store: str) -> dict[int, Entry]:
    """Every process under ``root``: (its name, prefixed with the engine it belongs to, if any; RSS; anonymous;
    store pages). A gateway worker's document process, which is replaced every 200 documents, is keyed by its
    role (minus its worker's pid), not its own pid: judged as one process, whichever child holds the role now."""
    tree = _children()
    seen: dict[int, Entry] = {}
    stack: list[tuple[int, str, int | None]] = [(root, "", None)]
    while stack:
        pid, owner, parent = stack.pop()
        if _is_index_build(pid):
            continue  # lives for one build; its memory is the build's (bench/retrieval.py measures it)
        described = _describe(pid, store)
        if described is None:
            continue
        name, rss, anon, mapped, helper = described
        if helper and parent is not None:
            seen[-parent] = (f"document process of {parent}", rss, anon, mapped)
            stack.extend((child, owner, pid) for child in tree.get(pid, []))
            continue
        if "served-model-name=" in name:
            owner = name.split("served-model-name=", 1)[1].split()[0]
        seen[pid] = (f"{owner}: {name}" if owner and "served-model-name=" not in name else name, rss, anon, mapped)
        stack.extend((child, owner, pid) for child in tree.get(pid, []))
    return seen


@dataclass
class Memory:
    root: int
    store: str  # the vector store's folder: its file pages are reported apart from the rest
    samples: list[tuple[float, dict[int, Entry]]] = field(default_factory=list)

    async def watch(self, started: float, stop: asyncio.Event, every_s: float) -> None:
        while not stop.is_set():
            self.samples.append(
                (time.monotonic() - started, await asyncio.to_thread(sample_tree, self.root, self.store))
            )
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass


# -- load ----------------------------------------------------------------------------------------------------


@dataclass
class Tenant:
    name: str
    key: str
    tenant_id: str
    collection: str = ""
    documents: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Tally:
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=dict)

    def error(self, action: str, detail: str) -> None:
        self.errors[action] += 1
        if len(self.examples) < 12:
            self.examples.append(f"{action}: {detail[:300]}")


def _error_event(line: bytes) -> bool:
    """Whether a stream's ``data:`` line is an error event (an object with ``error``), not a chunk whose text says
    "error": the 30-minute soak of 2026-12-03 counted a chunk of the model's own word as one."""
    try:
        event = json.loads(line[len(b"data:") :])
    except ValueError:
        return True  # not JSON: not a chunk either
    return not isinstance(event, dict) or "error" in event


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


Action = Callable[[aiohttp.ClientSession, Tenant, random.Random], Awaitable[None]]


class Load:
    def __init__(self, gateway: str, admin: str, tenants: list[Tenant], tally: Tally) -> None:
        self.gateway = gateway
        self.admin = {"Authorization": f"Bearer {admin}"}
        self.tenants = tenants
        self.tally = tally
        self.uploading: set[str] = set()

    async def expect(
        self,
        session: aiohttp.ClientSession,
        action: str,
        method: str,
        path: str,
        status: int | tuple[int, ...],
        **kwargs: Any,
    ) -> Any:
        async with session.request(method, self.gateway + path, **kwargs) as response:
            body = await response.read()
            if response.status not in (status if isinstance(status, tuple) else (status,)):
                self.tally.error(action, f"{response.status} {body[:300]!r}")
                return None
            return json.loads(body) if body else {}

    async def chat(self, session: aiohttp.ClientSession, tenant: Tenant, rng: random.Random) -> None:
        body = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "Describe a " + sentence(rng, 6)}],
            "max_tokens": rng.choice((8, 16, 32)),
        }
        await self.expect(session, "chat", "POST", "/v1/chat/completions", 200, json=body, headers=tenant.headers)

    async def stream(self, session: aiohttp.ClientSession, tenant: Tenant, rng: random.Random, *, leave: bool) -> None:
        action = "stream left mid-way" if leave else "stream"
        body = {
            "model": CHAT_MODEL,
            "messages": [{"role": "user", "content": "Write about " + sentence(rng, 8)}],
            "max_tokens": 200 if leave else 32,
            "stream": True,
            **({"ignore_eos": True} if leave else {}),
        }
        url = self.gateway + "/v1/chat/completions"
        async with session.post(url, json=body, headers=tenant.headers) as response:
            if response.status != 200:
                self.tally.error(action, f"{response.status} {(await response.read())[:300]!r}")
                return
            events, done = 0, False
            async for line in response.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data:"):
                    if _error_event(line):
                        self.tally.error(action, line.decode(errors="replace"))
                        return
                    events += 1
                    if leave and events >= 5:
                        response.close()  # the client leaves; the gateway must stop the engine and settle
                        return
            if not done:
                self.tally.error(action, f"the stream ended without [DONE] after {events} events")

    async def embeddings(self, session: aiohttp.ClientSession, tenant: Tenant, rng: random.Random) -> None:
        body = {"model": EMBED_MODEL, "input": [sentence(rng, 12) for _ in range(rng.randint(1, 8))]}
        await self.expect(session, "embeddings", "POST", "/v1/embeddings", 200, json=body, headers=tenant.headers)

    async def upload(self, session: aiohttp.ClientSession, tenant: Tenant, rng: random.Random) -> None:
        if tenant.name in self.uploading:  # one upload per tenant at a time: the soak is not a flood
            return await self.query(session, tenant, rng)
        self.uploading.add(tenant.name)
        try:
            text = "\n\n".join(sentence(rng, 40) for _ in range(rng.randint(5, 25)))
            path = f"/v1/rag/collections/{tenant.collection}/documents?name=soak.txt"
            headers = {**tenant.headers, "Content-Type": "text/plain"}
            made = await self.expect(
                session, "rag upload", "POST", path, (200, 201), data=text.encode(), headers=headers
            )
            if made is not None:
                tenant.documents.append(made["id"])
            while len(tenant.documents) > KEPT_DOCUMENTS:
                old = tenant.documents.pop(0)
                path = f"/v1/rag/collections/{tenant.collection}/documents/{old}"
                await self.expect(session, "rag delete", "DELETE", path, 204, headers=tenant.headers)
        finally:
            self.uploading.discard(tenant.name)

    async def query(self, session: aiohttp.ClientSession, tenant: Tenant, rng: random.Random) -> None:
        body = {"collection_id": tenant.collection, "query": sentence(rng, 5), "top_k": 3}
        await self.expect(session, "rag query", "POST", "/v1/rag/query", 200, json=body, headers=tenant.headers)

    async def admin_call(self, session: aiohttp.ClientSession, _tenant: Tenant, rng: random.Random) -> None:
        path = rng.choice(
            ("/admin/tenants", "/admin/usage/?group_by=workflow", "/admin/budgets/", "/admin/audit/?limit=50")
        )
        await self.expect(session, "admin", "GET", path, 200, headers=self.admin)

    async def large_embeddings(self, session: aiohttp.ClientSession, tenant: Tenant, rng: random.Random) -> None:
        """The warm-up's first part: the largest embedding batches, of every length up to the model's context.

        An embedding worker's resident memory rises to a high-water mark set by the batch shapes it has run (oneDNN
        keeps a compiled primitive per shape, see ``engine_env``; not a leak): 1-8 short inputs at a time climb
        toward it for many minutes, batches of up to 64 inputs reach it in about a minute and then stay flat.
        Sending those first puts the warm-up's end at that mark, so what the verdict measures afterwards is growth,
        not the climb to it."""
        inputs = [sentence(rng, rng.randint(3, 150)) for _ in range(rng.randint(16, 64))]
        body = {"model": EMBED_MODEL, "input": inputs}
        await self.expect(session, "prime", "POST", "/v1/embeddings", 200, json=body, headers=tenant.headers)

    async def prime(self, seed: int, deadline: float) -> None:
        await self.run(random.Random(1000 + seed), deadline, [("prime", 1, self.large_embeddings)])

    def mix(self) -> list[tuple[str, int, Action]]:
        """The workers' actions: name, weight, what it does."""
        return [
            ("chat", 5, self.chat),
            ("stream", 4, lambda s, t, r: self.stream(s, t, r, leave=False)),
            ("stream left mid-way", 2, lambda s, t, r: self.stream(s, t, r, leave=True)),
            ("embeddings", 4, self.embeddings),
            ("rag upload", 1, self.upload),
            ("rag query", 3, self.query),
            ("admin", 2, self.admin_call),
        ]

    async def worker(self, seed: int, deadline: float, without: frozenset[str] = frozenset()) -> None:
        actions = [action for action in self.mix() if action[0] not in without]
        await self.run(random.Random(seed), deadline, actions)

    async def run(self, rng: random.Random, deadline: float, actions: list[tuple[str, int, Action]]) -> None:
        """A closed loop until ``deadline``: an action drawn by weight, for a tenant drawn at random, timed and
        tallied."""
        weights = [weight for _, weight, _ in actions]
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                name, _, action = rng.choices(actions, weights)[0]
                tenant = rng.choice(self.tenants)
                started = time.perf_counter()
                try:
                    await action(session, tenant, rng)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.tally.error(name, f"{type(exc).__name__}: {exc}")
                self.tally.done[name] += 1
                self.tally.latency.setdefault(name, []).append((time.perf_counter() - started) * 1000)


# -- set-up and verdict ----------------------------------------------------------------------------------------


async def make_tenants(env: dict[str, str], gateway: str, admin: str) -> list[Tenant]:
    tenants = []
    headers = {"Authorization": f"Bearer {admin}"}
    async with aiohttp.ClientSession() as session:
        for name in ("soak-a", "soak-b"):
            made = json.loads(ok(cli(env, "admin", "create-key", "--tenant", name, "--workflow", "soak", "--create")))
            tenant = Tenant(name, str(made["key"]), str(made["tenant_id"]))
            for kind in ("tokens", "requests"):
                body = {"scope_type": "tenant", "scope_id": tenant.tenant_id, "kind": kind, "limit": LARGE}
                async with session.post(
                    gateway + "/admin/budgets/", json={**body, "period": "month"}, headers=headers
                ) as response:
                    assert response.status == 201, await response.text()
            async with session.post(
                gateway + "/v1/rag/collections", json={"name": "soak"}, headers=tenant.headers
            ) as response:
                assert response.status == 201, await response.text()
                tenant.collection = (await response.json())["id"]
            tenants.append(tenant)
    return tenants


async def books(gateway: str, admin: str, tenants: list[Tenant], since: datetime) -> list[tuple[str, str, int, int]]:
    """(tenant, kind, budget used, ledger total) once the budgets have nothing reserved by requests and the
    ledger has caught up (both are written off the hot path; leases of the gateway stay reserved)."""
    headers = {"Authorization": f"Bearer {admin}"}
    rows: list[tuple[str, str, int, int]] = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for attempt in range(30):
            async with session.get(gateway + "/admin/budgets/") as response:
                budgets = (await response.json())["data"]
            params = {"group_by": "tenant", "from": since.isoformat()}
            async with session.get(gateway + "/admin/usage/", params=params) as response:
                usage = {row["group"]: row for row in (await response.json())["data"]}
            rows = []
            for tenant in tenants:
                ledger = usage.get(tenant.tenant_id, {})
                for budget in budgets:
                    if budget["scope_id"] == tenant.tenant_id and budget["kind"] in ("tokens", "requests"):
                        total = ledger.get("total_tokens" if budget["kind"] == "tokens" else "served", 0)
                        rows.append((tenant.name, budget["kind"], int(budget["used"]), int(total)))
            if all(used == total for _, _, used, total in rows) or attempt == 29:
                return rows
            await asyncio.sleep(2)
    return rows


def _size(entry: Entry, part: str) -> int:
    """``whole``: the RSS; ``judged``: the RSS less the vector store's file pages (``store``); ``anonymous``: the
    heap."""
    return {"whole": entry[1], "judged": entry[1] - entry[3], "anonymous": entry[2], "store": entry[3]}[part]


def memory_verdict(memory: Memory, warmup_s: float, total_s: float) -> tuple[bool, list[str]]:
    """Flat when, for every process, the RSS less the pages of the vector store's own files grew at most 10 %.
    Those pages (its segments and its write-ahead log, mapped by the process that owns the store) come and go
    with what is written: the log grows until a flush and an index build cut it (every 20,000 points written, or
    when most of what was written is deleted again), by 32 MiB files. They are page cache, not heap, and are
    printed apart, with the whole RSS, so that a reader sees both."""
    window = max(60.0, (total_s - warmup_s) / 10)
    early = [s for t, s in memory.samples if warmup_s <= t < warmup_s + window]
    late = [s for t, s in memory.samples if t >= total_s - window]
    if not early or not late:
        return False, ["too few memory samples (run longer than the warm-up plus two minutes)"]
    names = {pid: entry[0] for _, sample in memory.samples for pid, entry in sample.items()}
    lines, flat = [], True

    def median(samples: list[dict[int, Entry]], pid: int | None, part: str = "judged") -> float:
        values = [
            (sum(_size(entry, part) for entry in s.values()) if pid is None else _size(s[pid], part))
            for s in samples
            if pid is None or pid in s
        ]
        return statistics.median(values) if values else 0.0

    pids = sorted({pid for s in early for pid in s} | {pid for s in late for pid in s})
    for pid in [*pids, None]:
        name = "all processes together" if pid is None else f"{pid:>7} {names[pid]}"
        first, last = median(early, pid), median(late, pid)
        peak = max(
            (sum(_size(entry, "judged") for entry in s.values()) if pid is None else _size(s[pid], "judged"))
            for t, s in memory.samples
            if t >= warmup_s and (pid is None or pid in s)
        )
        if first == 0 or last == 0:
            lines.append(f"  {name:<70} present only {'early' if last == 0 else 'late'}: restarted or new")
            flat = False
            continue
        growth = last / first - 1
        flat &= growth <= 0.10
        whole = [median(early, pid, "whole"), median(late, pid, "whole")]
        anon = [median(early, pid, "anonymous"), median(late, pid, "anonymous")]
        store = [median(early, pid, "store"), median(late, pid, "store")]
        lines.append(
            f"  {name[:70]:<70} after warm-up {first / 2**20:8.1f} MiB  end {last / 2**20:8.1f} MiB  "
            f"peak {peak / 2**20:8.1f} MiB  {growth * 100:+6.1f} %  (anonymous {anon[0] / 2**20:.1f} -> "
            f"{anon[1] / 2**20:.1f} MiB"
            + (
                f"; vector store files {store[0] / 2**20:.1f} -> {store[1] / 2**20:.1f} MiB, whole RSS "
                f"{whole[0] / 2**20:.1f} -> {whole[1] / 2**20:.1f} MiB, {(whole[1] / whole[0] - 1) * 100:+.1f} %"
                if any(store)
                else ""
            )
            + ")"
        )
    return flat, lines


async def soak(args: argparse.Namespace, env: dict[str, str], status: dict[str, Any]) -> bool:
    gateway = status["gateway_url"]
    admin = ok(cli(env, "admin", "token", "--role", "admin")).strip()
    since = datetime.now(UTC)
    tenants = await make_tenants(env, gateway, admin)
    tally = Tally()
    load = Load(gateway, admin, tenants, tally)
    memory = Memory(int(status["supervisor_pid"]), os.path.realpath(args.data_dir / "qdrant"))
    total_s, warmup_s = args.minutes * 60, args.warmup_minutes * 60
    started = time.monotonic()
    stop = asyncio.Event()
    watcher = asyncio.create_task(memory.watch(started, stop, args.sample_s))
    print(
        f"soak: {args.minutes:g} min of mixed load, {args.workers} workers, warm-up {args.warmup_minutes:g} min "
        f"(of which {min(args.prime_minutes, args.warmup_minutes):g} min of the largest embedding batches)"
        + (f"; left out: {', '.join(sorted(args.without))}" if args.without else "")
    )

    async def progress() -> None:
        while not stop.is_set():
            await asyncio.sleep(60)
            # Admin tokens live identity.token_ttl_s (10 min): a fresh one every minute, as a console would.
            fresh = ok(await asyncio.to_thread(cli, env, "admin", "token", "--role", "admin")).strip()
            load.admin = {"Authorization": f"Bearer {fresh}"}
            total = sum(entry[1] for entry in memory.samples[-1][1].values()) if memory.samples else 0
            print(
                f"  {(time.monotonic() - started) / 60:5.1f} min: {sum(tally.done.values())} calls, "
                f"{sum(tally.errors.values())} errors, RSS of all processes {total / 2**20:.0f} MiB",
                flush=True,
            )

    reporter = asyncio.create_task(progress())
    primed = started + min(args.prime_minutes * 60, warmup_s)
    await asyncio.gather(*(load.prime(n, primed) for n in range(args.workers)))
    await asyncio.gather(*(load.worker(n, started + total_s, args.without) for n in range(args.workers)))
    stop.set()
    await watcher
    reporter.cancel()
    elapsed = time.monotonic() - started

    print(f"\nLoad over {elapsed / 60:.1f} min (calls, errors, P50/P99 latency ms):")
    for name, count in sorted(tally.done.items()):
        values = sorted(tally.latency[name])
        p50, p99 = values[len(values) // 2], values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
        print(f"  {name:<22} {count:>6} calls  {tally.errors[name]:>4} errors   P50 {p50:9.1f}   P99 {p99:9.1f}")
    for example in tally.examples:
        print("   error:", example)

    on_disk = sum(f.stat().st_size for f in Path(memory.store).rglob("*") if f.is_file())
    flat, lines = memory_verdict(memory, warmup_s, elapsed)
    print(f"\nResident memory ({len(memory.samples)} samples every {args.sample_s:g}s; medians of the tenth after")
    print("the warm-up and of the last tenth, at least a minute each; growth allowed: 10 %; judged: RSS less the")
    print("pages of the vector store's own files, shown apart):")
    print("\n".join(lines))
    print(f"  the vector store's files on disk at the end: {on_disk / 2**20:.1f} MiB")

    verify = cli(env, "audit", "verify", timeout=600)
    print(f"\n`appliance audit verify`: exit {verify.returncode}\n  " + (verify.stdout + verify.stderr).strip()[-600:])

    admin = ok(cli(env, "admin", "token", "--role", "admin")).strip()
    rows = await books(gateway, admin, tenants, since)
    print("\nLedger against budgets (per tenant):")
    for name, kind, used, total in rows:
        agree = "equal" if used == total else "DIFFER"
        print(f"  {name:<8} {kind:<9} budget used {used:>10}   ledger {total:>10}   {agree}")

    checks = {
        "memory flat within 10 %": flat,
        "no unexpected error": not tally.errors,
        "audit chain verifies": verify.returncode == 0,
        "ledger equals budgets": bool(rows) and all(used == total for _, _, used, total in rows),
    }
    print()
    for check, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {check}")
    verdict = all(checks.values())
    print(f"\nsoak verdict: {'PASS' if verdict else 'FAIL'}")
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument(
        "--prime-minutes", type=float, default=0.0, help="the warm-up's first part: the largest embedding batches"
    )
    parser.add_argument("--workers", type=int, default=3, help="closed-loop clients")
    parser.add_argument(
        "--without",
        default="",
        help="actions left out of the mix, comma-separated (e.g. 'rag upload'): which load makes a process grow",
    )
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--port", type=int, default=29080, help="gateway port; engines from +21")
    args = parser.parse_args()
    args.without = frozenset(name.strip() for name in args.without.split(",") if name.strip())
    unknown = args.without - {name for name, _, _ in Load("", "", [], Tally()).mix()}
    if unknown:
        parser.error(f"--without: no action named {', '.join(sorted(unknown))}")
    data_dir = args.data_dir = ROOT / "var" / "soak"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    env = dict(
        os.environ,
        APPLIANCE_DATA_DIR=str(data_dir),
        APPLIANCE_MODELS_CACHE_DIR=str(ROOT / "var" / "models"),
        APPLIANCE_SERVER__PORT=str(args.port),
        APPLIANCE_ENGINES__PORT_BASE=str(args.port + 21),
        APPLIANCE_CONFIG=str(data_dir / "none.toml"),
    )
    started = time.monotonic()
    ok(cli(env, "up", "--detach", "--timeout", "1500"))
    print(f"appliance up in {time.monotonic() - started:.0f}s")
    try:
        status = json.loads(ok(cli(env, "status", "--json")))
        if not status["healthy"]:
            sys.exit(f"the appliance is not healthy: {status}")
        passed = asyncio.run(soak(args, env, status))
    finally:
        cli(env, "down")
    left = left_behind(data_dir)
    print(f"  {'FAIL' if left else 'PASS'}  no document process left once down" + (f": {left}" if left else ""))
    sys.exit(0 if passed and not left else 1)


def left_behind(data_dir: Path, wait_s: float = 10.0) -> list[int]:
    """Document processes of this run's appliance still alive ``wait_s`` after it went down."""
    deadline = time.monotonic() + wait_s
    marker = f"APPLIANCE_DATA_DIR={data_dir}".encode()
    while True:
        left = []
        for entry in os.listdir("/proc"):
            try:
                if not entry.isdigit() or DOCUMENT_PROCESS not in Path(f"/proc/{entry}/cmdline").read_bytes():
                    continue
                if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    left.append(int(entry))
            except OSError:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


if __name__ == "__main__":
    main()

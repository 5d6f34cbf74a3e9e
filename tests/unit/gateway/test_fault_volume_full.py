"""The audit volume full (issue 21, item 2), in the default layout: SQLite, whose file holds the audit log with
everything else, in the data folder.

The data folder is a small filesystem of its own (a tmpfs of a few MiB, mounted for the test: a real volume that
really fills, so it needs root; without the right to mount, the test is skipped and says why). A gateway process
serves a steady load from the fake engine; the volume is then filled to the last byte by another file. What is
checked: state-changing requests (inference, which writes usage and audit records, and an admin change) are
refused with 503 in the OpenAI envelope, never answered without their records; the audit chain verifies; once the
filler is deleted (space returns), service resumes by itself, without a restart."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fake_engine import FakeEngine
from tests.support.processes import Gateway, cli, node_env, running_gateway

VOLUME_MIB = 24
LOAD_LIMIT_S = 60.0  # until the volume refuses writes, and until service is back
REFUSED_FOR_S = 2.0  # refusals observed this long before space returns


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "volume"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_MIB}m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"mounting a small filesystem needs root (CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def gateway(tmp_path: Path, volume: Path, fake_engine: FakeEngine) -> Iterator[Gateway]:
    env = node_env(volume / "data", fake_engine.url, APPLIANCE_SERVER__LOG_LEVEL="warning")
    with running_gateway(env, tmp_path / "gateway.log") as gateway:
        yield gateway


def fill(folder: Path) -> Path:
    """A file that takes every free byte of ``folder``'s filesystem."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            while True:
                try:
                    handle.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    assert os.statvfs(folder).f_bavail == 0
    return filler


async def _chat(
    session: aiohttp.ClientSession, url: str, key: str, stream: bool
) -> tuple[int, str | None, dict[str, Any]]:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "stream": stream}
    async with session.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        payload = await response.read()
        if response.status != 200:
            return response.status, response.headers.get("x-request-id"), json.loads(payload)
        whole = payload.rstrip().endswith(b"data: [DONE]") if stream else "choices" in json.loads(payload)
        if stream and not whole:
            # A stream under way when the volume filled: it ends with the 503 error as its last event instead of
            # `[DONE]` (README, audit): not answered, refused in-band.
            last = json.loads(payload.rstrip().rsplit(b"data: ", 1)[1])
            assert last["error"]["type"] == "service_unavailable", payload[-300:]
            return 503, response.headers.get("x-request-id"), last
        assert whole, payload[-200:]
        return 200, response.headers.get("x-request-id"), {}


async def _admin_change(session: aiohttp.ClientSession, url: str, admin: str) -> tuple[int, dict[str, Any]]:
    async with session.post(
        url + "/admin/tenants",
        json={"name": f"t-{uuid.uuid4().hex[:8]}"},
        headers={"Authorization": f"Bearer {admin}"},
    ) as response:
        return response.status, json.loads(await response.read())


def _envelope(body: dict[str, Any]) -> bool:
    error = body.get("error")
    return isinstance(error, dict) and {"message", "type", "code"} <= set(error)


def test_a_full_audit_volume_refuses_changes_keeps_the_chain_and_recovers(gateway: Gateway, volume: Path) -> None:
    env = gateway.env
    key = json.loads(cli(env, "admin", "create-key", "--tenant", "acme", "--workflow", "bots", "--create"))["key"]
    admin = cli(env, "admin", "token", "--role", "admin")
    answered: set[str | None] = set()

    async def scenario() -> tuple[list[tuple[int, dict[str, Any]]], float]:
        async with aiohttp.ClientSession() as session:
            for turn in range(20):  # served while there is room
                status, request_id, _ = await _chat(session, gateway.url, key, stream=turn % 2 == 0)
                assert status == 200
                answered.add(request_id)
            filler = await asyncio.to_thread(fill, volume)

            # Load until the database can no longer write (pages it had free are used first), then a while more.
            refusals: list[tuple[int, dict[str, Any]]] = []
            deadline = time.monotonic() + LOAD_LIMIT_S
            first_refusal: float | None = None
            turn = 0
            while first_refusal is None or time.monotonic() - first_refusal < REFUSED_FOR_S:
                assert time.monotonic() < deadline, "the full volume never refused a request"
                turn += 1
                status, request_id, body = await _chat(session, gateway.url, key, stream=turn % 2 == 0)
                if status == 200:
                    assert first_refusal is None, "answered again while the volume was still full"
                    answered.add(request_id)
                    continue
                first_refusal = first_refusal or time.monotonic()
                refusals.append((status, body))
            refusals.append(await _admin_change(session, gateway.url, admin))

            filler.unlink()  # space returns
            freed = time.monotonic()
            while True:
                assert time.monotonic() - freed < LOAD_LIMIT_S, "service did not come back once space returned"
                status, request_id, _ = await _chat(session, gateway.url, key, stream=False)
                if status == 200:
                    answered.add(request_id)
                    break
                await asyncio.sleep(0.2)
            recovered_s = time.monotonic() - freed
            status, _ = await _admin_change(session, gateway.url, admin)
            assert status == 201
            return refusals, recovered_s

    refusals, recovered_s = asyncio.run(scenario())
    assert refusals and all(status == 503 and _envelope(body) for status, body in refusals), refusals[:3]
    assert recovered_s < 10

    verified = json.loads(cli(env, "audit", "verify", "--json"))
    assert verified["ok"], verified
    with sqlite3.connect(Path(env["APPLIANCE_DATA_DIR"]) / "appliance.db") as db:
        rows = dict(db.execute("SELECT request_id, status_code FROM usage_records").fetchall())
        audited = dict(
            db.execute("SELECT request_id, outcome FROM audit_records WHERE event_type LIKE 'inference.%'").fetchall()
        )
    unmetered = sorted(str(r) for r in answered if rows.get(r) != 200 or audited.get(r) != "success")
    assert not unmetered, f"answers without their usage row or audit record: {unmetered[:5]}"
    assert gateway.process is not None and gateway.process.poll() is None

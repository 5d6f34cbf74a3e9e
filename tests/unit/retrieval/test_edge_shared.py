"""Two real processes on one embedded store: the first to open it owns the shards and serves the other over
its socket. A write in either is found by a search in the other as soon as its call returns; killing the owner
hands the store to the other process, which loads every acknowledged write (the WAL), nothing torn."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from appliance.lib.errors import ServiceUnavailableError
from appliance.retrieval.edge_shared import SOCKET, SharedEdgeStore
from appliance.retrieval.vectors import point_id
from tests.unit.retrieval.shared_child import vector

ROOT = Path(__file__).resolve().parents[3]


def child(root: Path, *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.retrieval.shared_child", str(root), *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def stop(process: subprocess.Popen[str]) -> None:
    if process.stdin is not None:
        process.stdin.close()
    process.wait(30)


async def test_a_write_in_one_process_is_found_by_a_search_in_the_other_as_soon_as_it_returns(tmp_path: Path) -> None:
    root = tmp_path / "q"
    writer = child(root, "write", "60")
    store = SharedEdgeStore(root)
    try:
        assert store.owner is None
        assert stat.S_IMODE((root / SOCKET).stat().st_mode) == 0o600, "only the appliance's user may connect"
        lags: list[float] = []
        assert writer.stdout is not None
        for i in range(60):
            assert writer.stdout.readline().strip() == f"wrote {i}"
            acknowledged = time.perf_counter()
            hits = await store.search("c", vector(i), 1)  # no retry, no wait: the first search must see it
            lags.append(time.perf_counter() - acknowledged)
            assert hits and hits[0].payload["document_id"] == f"child{i}", f"write {i} not visible in the other process"
        assert writer.stdout.readline().strip() == "done"
        # and the other way: this (client) process writes, its next count and the writer's shard agree
        await store.upsert("c", [point_id("parent", 0)], [vector(3)], [{"document_id": "parent", "text": "x"}])
        assert await store.count("c") == 61 and await store.count("c", "parent") == 1
        assert max(lags) < 1.0, lags
    finally:
        stop(writer)
        store.close()
    # the writer is gone: this process takes the store over and finds everything
    reopened = SharedEdgeStore(root)
    assert await reopened.count("c") == 61
    assert reopened.owner is not None
    reopened.close()


async def test_killing_the_owner_hands_the_store_to_the_other_process_with_every_acknowledged_write(
    tmp_path: Path,
) -> None:
    root = tmp_path / "q"
    owner = child(root, "serve")
    store = SharedEdgeStore(root, failover_s=20)
    acknowledged = 0
    errors: list[BaseException] = []
    stop_writing = threading.Event()

    async def write(i: int) -> None:
        await store.upsert("c", [point_id(f"p{i}", 0)], [vector(i)], [{"document_id": f"p{i}", "text": f"n {i}"}])

    try:
        for i in range(40):  # through the owner
            await write(i)
            acknowledged += 1
        readers_saw: list[int] = []

        def read() -> None:  # a second thread of this process keeps searching across the handover
            try:
                while not stop_writing.is_set():
                    readers_saw.append(len(store.call_now("search", "c", vector(1), 5, None)))
            except BaseException as exc:  # the test fails on any
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        for i in range(40, 80):  # the first of these finds the owner dead and takes the store over
            await write(i)
            acknowledged += 1
        stop_writing.set()
        reader.join(30)
        assert not errors, errors
        assert store.owner is not None, "the surviving process owns the store now"
        assert await store.count("c") == acknowledged == 80
        for i in (0, 39, 40, 79):
            hits = await store.search("c", vector(i), 1)
            assert hits[0].payload["document_id"] == f"p{i}"
        assert readers_saw and all(n == 5 for n in readers_saw)
    finally:
        stop_writing.set()
        if owner.poll() is None:
            owner.kill()
        store.close()


async def test_an_owner_that_never_answers_is_reported_not_waited_for_forever(tmp_path: Path) -> None:
    """A process holding the lock without serving (a fake owner: a hung one cannot be made on purpose
    otherwise) makes calls fail with 503 after the failover time, not hang."""
    import fcntl

    root = tmp_path / "q"
    root.mkdir()
    held = (root / ".lock").open("ab")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    store = SharedEdgeStore(root, failover_s=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="owner process cannot be reached"):
            await store.count("c")
        assert time.monotonic() - started < 5
    finally:
        held.close()
        store.close()


async def test_an_owner_whose_socket_path_is_too_long_still_serves_its_own_process(tmp_path: Path) -> None:
    root = tmp_path / ("deep" * 30) / "q"  # past the 107 bytes of a Unix socket's path
    store = SharedEdgeStore(root)
    await store.create("c", 16)
    await store.upsert("c", [point_id("d", 0)], [vector(2)], [{"document_id": "d", "text": "t"}])
    assert store.owner is not None and not (root / SOCKET).exists()
    assert (await store.search("c", vector(2), 1))[0].payload["document_id"] == "d"
    store.close()

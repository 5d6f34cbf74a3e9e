"""A stalled client on a stream (issue 21, item 2): the gateway does not buffer what the client does not read.

A client asks for a large stream (64 choices of 8,000 tokens: about 100 MB of events from the engine) and then
reads nothing, with a receive buffer of 4 KiB. The gateway relays a chunk only once the one before was handed to
the client's connection (uvicorn's flow control), and reads the engine only as it relays (aiohttp's reader
pauses), so the engine is back-pressured: what it has written stops growing at what the sockets in between hold,
a small part of the answer (about 10 MB of 100 here: what loopback's socket buffers took), and the gateway's
resident memory stays flat. When the stalled client finally goes
away, or once it has taken nothing for ``gateway.stream_stall_s`` (8 s here, 60 s by default) while keeping its
connection open, the request is settled as a client that left: charged what the engine generated until then, and
the engine's connection is closed. The engine is the fast fake of tests/support (it counts the bytes it has
written)."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fake_engine
from tests.support.fake_engine import FakeEngine
from tests.support.processes import Gateway, cli, node_env, running_gateway

CHOICES, TOKENS = 64, 8_000
STALL_S = 8.0  # longer than the engine takes to fill the sockets on a loaded machine
EVENT_BYTES = 190  # about, for one token of one choice
ANSWER_BYTES = CHOICES * TOKENS * EVENT_BYTES


@pytest.fixture
def gateway(tmp_path: Path, fake_engine: FakeEngine) -> Iterator[Gateway]:
    env = node_env(
        tmp_path / "data",
        fake_engine.url,
        APPLIANCE_SERVER__LOG_LEVEL="warning",
        APPLIANCE_GATEWAY__STREAM_STALL_S=str(STALL_S),
    )
    with running_gateway(env, tmp_path / "gateway.log") as gateway:
        yield gateway


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled_stream(gateway: Gateway, key: str) -> tuple[socket.socket, str]:
    """A stream asked for and its status line read; then nothing more is read. The request id."""
    body = json.dumps(
        {
            "model": "fake",
            "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": TOKENS,
            "n": CHOICES,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window it offers
    client.connect(("127.0.0.1", gateway.port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    client.sendall(head + body)
    received = client.recv(1024).decode("latin-1")
    assert received.startswith("HTTP/1.1 200"), received
    request_id = next(
        line.split(":", 1)[1].strip() for line in received.split("\r\n") if line.lower().startswith("x-request-id:")
    )
    return client, request_id


def settled(gateway: Gateway, request_id: str, timeout: float) -> tuple[int, int, int] | None:
    """(status, client_disconnected, completion_tokens) of the request's usage row, once written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(Path(gateway.env["APPLIANCE_DATA_DIR"]) / "appliance.db") as db:
            row = db.execute(
                "SELECT status_code, client_disconnected, completion_tokens FROM usage_records WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        if row is not None:
            return (int(row[0]), int(row[1]), int(row[2]))
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("client", ["leaves", "stays"])
def test_a_stalled_stream_client_back_pressures_the_engine_and_is_cut_in_bounded_time(
    gateway: Gateway, client: str
) -> None:
    key = json.loads(cli(gateway.env, "admin", "create-key", "--tenant", "acme", "--workflow", "w", "--create"))["key"]
    before = rss(gateway.pid)
    written = fake_engine.STREAMED_BYTES
    written[0] = 0
    connection, request_id = stalled_stream(gateway, key)
    try:
        stalled = time.monotonic()
        samples = [written[0]]
        while len(samples) < 4 or samples[-1] != samples[-4]:  # until 0.6 s without a byte more
            assert time.monotonic() - stalled < STALL_S, f"the engine was never held back: {samples[-5:]}"
            time.sleep(0.2)
            samples.append(written[0])
        held = samples[-1]
        grown = rss(gateway.pid) - before
        assert 0 < held < ANSWER_BYTES / 4, f"the engine wrote {held} of {ANSWER_BYTES} bytes for a client reading none"
        assert grown < 16 * 2**20, f"the gateway grew by {grown / 2**20:.1f} MiB"
        if client == "leaves":
            connection.close()
        row = settled(gateway, request_id, timeout=STALL_S + 10)
        assert row is not None, "the request was never settled"
        if client == "stays":
            assert time.monotonic() - stalled >= STALL_S, "cut before the client had stalled for stream_stall_s"
    finally:
        connection.close()
    status, disconnected, completion_tokens = row
    assert (status, disconnected) == (200, 1) and 0 < completion_tokens < CHOICES * TOKENS
    stopped = written[0]
    time.sleep(1.0)
    assert written[0] == stopped, "the engine went on generating for nobody"

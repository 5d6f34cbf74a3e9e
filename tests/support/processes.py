"""Gateway processes of their own (`appliance serve`, as a node runs them) for fault tests: started on a port,
stopped with SIGTERM, or killed. The engine is whatever URL the caller routes the model `fake` to."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.fake_engine import free_port

ROOT = Path(__file__).resolve().parents[2]


def node_env(data_dir: Path, engine_url: str, **settings: str) -> dict[str, str]:
    """The environment of gateways on ``data_dir`` whose one model, `fake`, is served at ``engine_url``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return dict(
        os.environ,
        APPLIANCE_DATA_DIR=str(data_dir),
        APPLIANCE_GATEWAY__ROUTES=json.dumps([{"model": "fake", "url": engine_url}]),
        **settings,
    )


def cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


class Gateway:
    """One `appliance serve` process (one worker: the process that answers is the one a signal reaches)."""

    def __init__(self, env: dict[str, str], log: Path, port: int | None = None, **settings: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = dict(env, APPLIANCE_SERVER__PORT=str(self.port), **settings)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, **preexec: Any) -> Gateway:
        with self.log.open("ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "serve"],
                env=self.env,
                cwd=ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **preexec,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the gateway did not come up:\n{self.log.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """``kill -9``: nothing of the process's own runs after this."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> bool:
        """SIGTERM, as systemd stops the unit; whether it stopped cleanly (uvicorn, once shut down, raises the
        signal it caught again: a clean stop exits by SIGTERM, or 0)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
                return False
        return self.process.returncode in (0, -signal.SIGTERM)


@contextmanager
def running_gateway(env: dict[str, str], log: Path) -> Iterator[Gateway]:
    """One ``appliance serve`` on ``env``'s data (its schema and secrets made first), killed afterwards."""
    cli(env, "admin", "token", "--role", "admin")
    gateway = Gateway(env, log).start()
    try:
        yield gateway
    finally:
        gateway.kill()


async def chat_outcome(session: aiohttp.ClientSession, url: str, key: str, stream: bool) -> tuple[str, str | None]:
    """One small chat completion against the fake engine: (outcome, request id). The outcome is `answered` only when
    the client saw the whole answer (a 200 with its body, or a stream up to ``[DONE]``); else the status, `cut` or
    `broken` (no HTTP answer)."""
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4, "stream": stream}
    try:
        async with session.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            request_id = response.headers.get("x-request-id")
            payload = await response.read()
            if response.status != 200:
                return str(response.status), request_id
            if stream and not payload.rstrip().endswith(b"data: [DONE]"):
                return "cut", request_id
            if not stream:
                json.loads(payload)
            return "answered", request_id
    except (aiohttp.ClientError, json.JSONDecodeError):
        return "broken", None


def budgeted_key(target: Any, limit: int) -> tuple[dict[str, Any], str]:
    """A new key of tenant `acme`, workflow `bots`, with a tokens budget of ``limit`` on the workflow, set through the
    admin API of ``target`` (anything with the gateway's ``env`` and ``url``), as an admin sets it. Returns the key as
    `appliance admin create-key` prints it, and the admin token that set the budget."""
    env = target.env
    key: dict[str, Any] = json.loads(
        cli(env, "admin", "create-key", "--tenant", "acme", "--workflow", "bots", "--create")
    )
    admin = cli(env, "admin", "token", "--role", "admin")

    async def budget() -> None:
        body = {"scope_type": "workflow", "scope_id": key["workflow_id"], "kind": "tokens", "limit": limit}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
            async with session.post(target.url + "/admin/budgets/", json=body) as response:
                assert response.status == 201, await response.text()

    asyncio.run(budget())
    return key, admin

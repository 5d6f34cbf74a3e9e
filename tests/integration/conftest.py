"""Integration fixtures: the real appliance (vLLM CPU engines + gateway) started once per test session
through the real CLI (`appliance up --detach`), on ports of its own so a running `make run` is untouched."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from appliance.settings import REPO_ROOT

TEST_DATA_DIR = REPO_ROOT / "var" / "test"
# Prepared models are shared with `make run` (verified by sha256 before every start), which also lets the
# engines reuse their compilation cache (keyed by the model's path).
MODELS_CACHE_DIR = REPO_ROOT / "var" / "models"
GATEWAY_PORT = 18080
ENGINE_PORT_BASE = 18101


def run_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The `appliance` command, as a user runs it, with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_output(env: dict[str, str], *args: str) -> str:
    """What the `appliance` command printed; it must succeed."""
    result = run_cli(env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@dataclass
class Appliance:
    env: dict[str, str]
    data_dir: Path
    gateway_url: str
    api_key: str = ""  # an inference key of the integration tenant, made once per session

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        return dict(json.loads(result.stdout))

    def engine_url(self, model: str) -> str:
        return next(e["url"] for e in self.status()["engines"] if e["model"] == model)

    def rows(self, sql: str, *params: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """What ``sql`` selects, once it selects something: usage rows and audit records are journaled before an
        answer and committed in group commits after it (poll until they land)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            connection = sqlite3.connect(self.data_dir / "appliance.db")
            connection.row_factory = sqlite3.Row
            try:
                rows = connection.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                rows = []
            finally:
                connection.close()
            if rows:
                return [dict(row) for row in rows]
            time.sleep(0.1)
        raise AssertionError(f"nothing for {params} after {timeout} s: {sql}")

    def usage_row(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The ledger row of one request."""
        return self.rows("SELECT * FROM usage_records WHERE request_id = ?", request_id, timeout=timeout)[0]


@pytest.fixture(scope="session")
def appliance() -> Iterator[Appliance]:
    env = dict(os.environ)
    env.update(
        APPLIANCE_DATA_DIR=str(TEST_DATA_DIR),
        APPLIANCE_MODELS_CACHE_DIR=str(MODELS_CACHE_DIR),
        APPLIANCE_SERVER__PORT=str(GATEWAY_PORT),
        APPLIANCE_ENGINES__PORT_BASE=str(ENGINE_PORT_BASE),
        APPLIANCE_CONFIG=str(TEST_DATA_DIR / "none.toml"),
    )
    handle = Appliance(env=env, data_dir=TEST_DATA_DIR, gateway_url=f"http://127.0.0.1:{GATEWAY_PORT}")
    if os.environ.get("APPLIANCE_TEST_REUSE") == "1" and handle.status()["healthy"]:
        # Developer convenience while iterating: keep the engines of an earlier run (never in CI).
        handle.api_key = create_key(handle)
        yield handle
        return
    handle.cli("down")  # a previous run that was killed may have left it up
    (TEST_DATA_DIR / "appliance.db").unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        (TEST_DATA_DIR / f"appliance.db{suffix}").unlink(missing_ok=True)
    shutil.rmtree(TEST_DATA_DIR / "qdrant", ignore_errors=True)  # its collections belonged to that database
    # ... and so did the latest signed checkpoint: kept, it would show this new database as a rollback.
    (TEST_DATA_DIR / "audit" / "latest-checkpoint").unlink(missing_ok=True)
    started = time.monotonic()
    result = handle.cli("up", "--detach", "--timeout", "1500", timeout=1600)
    if result.returncode != 0:
        pytest.fail(f"appliance up failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    print(f"\nappliance up in {time.monotonic() - started:.0f}s", file=sys.stderr)
    handle.api_key = create_key(handle)
    yield handle
    if os.environ.get("APPLIANCE_TEST_REUSE") != "1":
        handle.cli("down")


def create_key(appliance: Appliance) -> str:
    result = appliance.cli(
        "admin", "create-key", "--tenant", "integration", "--workflow", "tests", "--agent", "pytest", "--create"
    )
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["key"])


@pytest.fixture(scope="session")
def client(appliance: Appliance) -> OpenAI:
    return OpenAI(base_url=appliance.gateway_url + "/v1", api_key=appliance.api_key, max_retries=0, timeout=120)


CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "minilm-l6-v2"


def gateway_env(appliance: Appliance, data_dir: Path, **settings: str) -> dict[str, str]:
    """Environment of an extra gateway process of its own (data dir, settings) in front of the session's
    engines."""
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    routes = [
        {"model": e["model"], "url": e["url"], "runner": "pooling" if e["model"] == EMBED_MODEL else "generate"}
        for e in appliance.status()["engines"]
    ]
    return dict(
        appliance.env, APPLIANCE_DATA_DIR=str(data_dir), APPLIANCE_GATEWAY__ROUTES=json.dumps(routes), **settings
    )


def start_gateway(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """A gateway process as `appliance up` runs it (uvicorn), once it answers /healthz."""
    command = [sys.executable, "-m", "uvicorn", "appliance.asgi:create_served_app", "--factory", "--port", str(port)]
    with log.open("ab") as handle:
        process = subprocess.Popen(
            [*command, "--no-access-log", "--log-level", "warning"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"gateway on port {port} exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    pytest.fail(f"gateway on port {port} did not become healthy:\n{log.read_text()[-3000:]}")


def stop_gateway(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

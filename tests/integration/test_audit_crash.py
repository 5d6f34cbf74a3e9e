"""A gateway killed with SIGKILL under load leaves an audit chain that verifies, and every request that
was answered has its record and its usage row once the gateway is started again (as its unit is): what the dead
process had journaled is written then. (The upstream is the fake engine: the crash is the gateway's, not vLLM's.)"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from appliance.audit.setup import audit_store
from appliance.identity.setup import embedded_issuer
from appliance.settings import Settings
from tests.support.fake_engine import FakeEngine, free_port
from tests.support.gateway import add_tenant

pytestmark = pytest.mark.integration


async def load(url: str, token: str, answered: list[str], stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": n % 2 == 0}
            try:
                async with session.post(url, json=body) as response:
                    text = await response.text()
                    if response.status == 200 and (not body["stream"] or "[DONE]" in text):
                        answered.append(response.headers["x-request-id"])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)


async def test_sigkill_under_load(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.start()
    port = free_port()
    settings = Settings(data_dir=tmp_path)
    add_tenant(settings, "t1")  # a token's tenant must exist
    token = embedded_issuer(settings).mint("loader", client_id="c", roles=["user"], tenant_id="t1", ttl_s=600)
    env = dict(
        os.environ,
        APPLIANCE_DATA_DIR=str(tmp_path),
        APPLIANCE_GATEWAY__ROUTES=f'[{{"model": "fake", "url": "{engine.url}"}}]',
        APPLIANCE_AUDIT__CHECKPOINT_EVERY="50",
    )

    def start() -> subprocess.Popen[bytes]:
        command = ["-m", "uvicorn", "appliance.asgi:create_served_app", "--factory", "--port", str(port)]
        return subprocess.Popen([sys.executable, *command, "--log-level", "warning", "--no-access-log"], env=env)

    async def healthy(base: str) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                try:
                    async with session.get(base + "/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not come up")

    gateway = start()
    try:
        base = f"http://127.0.0.1:{port}"
        await healthy(base)
        answered: list[str] = []
        stop = asyncio.Event()
        workers = [asyncio.create_task(load(base + "/v1/chat/completions", token, answered, stop)) for _ in range(32)]
        deadline = time.monotonic() + 30
        while len(answered) < 300 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        os.kill(gateway.pid, signal.SIGKILL)  # mid-flight: requests are being served and recorded
        gateway.wait(10)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        gateway = start()  # started again, as systemd does: it writes what the dead process journaled
        await healthy(base)
        gateway.terminate()
        assert gateway.wait(30) in (0, -signal.SIGTERM), "a clean stop"
    finally:
        if gateway.poll() is None:
            gateway.kill()
        engine.stop()

    assert len(answered) >= 300
    result = audit_store(settings).verify()
    assert result.ok, result
    recorded = {
        row[0]
        for row in sqlite3.connect(tmp_path / "appliance.db").execute(
            "SELECT request_id FROM audit_records WHERE event_type = 'inference.completions'"
        )
    }
    missing = [rid for rid in answered if rid not in recorded]
    assert missing == [], f"{len(missing)} answered requests have no audit record"
    database = sqlite3.connect(tmp_path / "appliance.db")
    rows = {row[0] for row in database.execute("SELECT request_id FROM usage_records")}
    unmetered = [rid for rid in answered if rid not in rows]
    assert unmetered == [], f"{len(unmetered)} answered requests have no usage row"
    assert list((tmp_path / "journal").glob("*.journal")) == [], "every journal is written and removed"

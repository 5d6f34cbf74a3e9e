"""Deploying, switching under load, rolling back and retiring, through the real gateway app and real engine
processes started by the registry's deploy code.

The engines are the fake OpenAI-shaped engine (tests/support/fake_engine.py) registered as an engine kind of its
own (a launch command, /health, /metrics with its requests in flight): starting two real vLLM engines per
version switch is too heavy for this 2-core machine, and the switch, the drain and the rollback are the
registry's and the gateway's, whatever answers behind them. The vLLM path of the same deploy code is exercised
by tests/integration/test_registry.py."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import delete, event
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from appliance.asgi import create_app
from appliance.engines.runner import http_ok, pid_alive
from appliance.identity.setup import embedded_issuer
from appliance.lib.errors import ConflictError, PermissionDeniedError
from appliance.registry import deploy, service
from appliance.registry.files import RegistryIntegrityError
from appliance.registry.importer import import_model
from appliance.registry.models import ModelTransition, ModelVersion, ServedModel
from appliance.settings import REPO_ROOT, EngineKind, RegistrySettings, Settings
from tests.support.fake_engine import free_port
from tests.support.gateway import add_tenant, admin_headers
from tests.unit.registry.conftest import tiny_model

FAKE_KIND = EngineKind(
    command=[
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); "
        "from tests.support.fake_engine import serve_forever; serve_forever({port}, metrics=True)",
    ]
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        registry=RegistrySettings(
            require_distinct_approver=True,
            port_base=free_port(),
            poll_interval_s=0.2,
            drain_timeout_s=30,
            engine_kinds={"fake": FAKE_KIND},
        ),
    )


@pytest.fixture
def versions(db: Engine, settings: Settings, tmp_path: Path) -> list[int]:
    """Two approved versions of `team-chat` (imported by alice, approved by bob)."""
    if not (REPO_ROOT / "var" / "models" / "smollm2-135m-instruct" / "config.json").exists():
        pytest.skip("the bundled chat model is not prepared")
    ids = []
    with Session(db) as session:
        for number in (1, 2):
            source = tiny_model(tmp_path / f"src{number}")
            version = import_model(session, settings, source, "team-chat", "alice", engine_kind="fake")
            assert version.id is not None
            with pytest.raises(PermissionDeniedError, match="another administrator must approve"):
                service.approve(session, settings, version.id, "alice")
            assert service.approve(session, settings, version.id, "bob").state == "approved"
            ids.append(version.id)
    return ids


@asynccontextmanager
async def served_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app behind a real HTTP server, and a client of it (the test client runs one request at a time)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await task


async def chat_stream(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    """One streamed chat (the fake answers `slow` over ~0.2 s); '' when complete, else what went wrong."""
    body = {"model": "team-chat", "messages": [{"role": "user", "content": "slow"}], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        text = "".join([chunk async for chunk in response.aiter_text()])
    if response.status_code != 200:
        return f"{response.status_code}: {text[:200]}"
    return "" if text.rstrip().endswith("data: [DONE]") else f"incomplete stream: {text[-200:]}"


async def engine_urls(client: httpx.AsyncClient, admin: dict[str, str]) -> list[str]:
    ready = (await client.get("/readyz", headers=admin)).json()
    return [e["url"] for e in ready["engines"] if e["model"] == "team-chat"]


async def wait_for_urls(client: httpx.AsyncClient, admin: dict[str, str], urls: list[str]) -> None:
    for _ in range(100):
        if await engine_urls(client, admin) == urls:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway routes team-chat to {await engine_urls(client, admin)}, not {urls}")


def served(db: Engine) -> dict[str, Any]:
    with Session(db) as session:
        return service.served_models(session)[0]


async def test_deploy_switch_under_load_rollback_and_retire(
    db: Engine, settings: Settings, versions: list[int]
) -> None:
    v1, v2 = versions
    add_tenant(settings, "t1")
    token = embedded_issuer(settings).mint("u", client_id="c", roles=["user"], tenant_id="t1")
    user = {"Authorization": f"Bearer {token}"}
    admin = admin_headers(settings)
    try:
        async with served_app(settings) as client:
            assert (await chat_stream(client, user)).startswith("404"), "nothing serves team-chat before a deploy"

            first = await asyncio.to_thread(deploy.deploy, db, settings, v1, "bob")
            assert first["state"] == "deployed" and first["serving"]
            v1_engines = served(db)["engines"]
            await wait_for_urls(client, admin, [e["url"] for e in v1_engines])
            assert await chat_stream(client, user) == ""

            failures: list[str] = []
            done = 0
            stop = asyncio.Event()

            async def load() -> None:
                nonlocal done
                while not stop.is_set():
                    failures.append(await chat_stream(client, user))
                    done += 1

            workers = [asyncio.create_task(load()) for _ in range(6)]
            await asyncio.sleep(0.5)
            second = await asyncio.to_thread(deploy.deploy, db, settings, v2, "bob")  # switches under load
            assert second["state"] == "deployed"
            v2_engines = served(db)["engines"]
            await wait_for_urls(client, admin, [e["url"] for e in v2_engines])
            assert not pid_alive(v1_engines[0]["pid"]), "v1's engine is stopped once drained"
            switched_at = done
            await asyncio.sleep(0.5)
            rolled = await asyncio.to_thread(deploy.rollback, db, settings, "team-chat", "carol")
            assert rolled["version"] == 1 and rolled["transitions"][-1]["action"] == "rollback"
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
            errors = [f for f in failures if f]
            assert not errors, errors[:5]
            assert done > switched_at > 10, (done, switched_at)  # requests ran before, during and after
            back = served(db)
            assert back["version_id"] == v1 and back["previous_version_id"] == v2
            await wait_for_urls(client, admin, [e["url"] for e in back["engines"]])
            assert not pid_alive(v2_engines[0]["pid"])

            with Session(db) as session:
                with pytest.raises(ConflictError, match="is deployed"):
                    service.retire(session, settings, v1, "bob")
                assert service.retire(session, settings, v2, "bob").state == "retired"
                with pytest.raises(ConflictError, match="only an approved version"):
                    await asyncio.to_thread(deploy.deploy, db, settings, v2, "bob")
                removed = service.remove_files(session, settings, v2, "bob")
                assert removed.files_removed and not Path(removed.path).exists()
                history = [(t["action"], t["to_state"], t["actor"]) for t in service.show(session, v2)["transitions"]]
            assert history == [
                ("import", "imported", "alice"),
                ("approve", "approved", "bob"),
                ("deploy", "deployed", "bob"),
                ("undeploy", "approved", "carol"),
                ("retire", "retired", "bob"),
                ("remove", "retired", "bob"),
            ]
            listing = (await client.get("/admin/models/", headers=admin)).json()["data"]
            assert [(row["version"], row["state"], row["serving"]) for row in listing] == [
                (1, "deployed", True),
                (2, "retired", False),
            ]

        # The registry survives a restart: a new gateway process routes the served name from the database.
        async with served_app(settings) as client:
            assert await chat_stream(client, user) == ""
            assert await engine_urls(client, admin) == [e["url"] for e in back["engines"]]
    finally:
        deploy.stop_all(db)


def test_deploy_refuses_weights_changed_since_import(db: Engine, settings: Settings, versions: list[int]) -> None:
    with Session(db) as session:
        version = session.get(ModelVersion, versions[0])
        assert version is not None
        weights = Path(version.path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryIntegrityError, match=r"model\.safetensors has sha256"):
        deploy.deploy(db, settings, versions[0], "bob")
    (weights.parent / "extra.bin").write_bytes(b"x")
    with pytest.raises(RegistryIntegrityError, match=r"not recorded at import: extra\.bin"):
        deploy.deploy(db, settings, versions[0], "bob")
    with Session(db) as session:
        assert service.served_models(session) == []  # nothing was switched


def test_up_starts_the_deployed_versions_again_on_their_ports(
    db: Engine, settings: Settings, versions: list[int]
) -> None:
    """After a stop (or a reboot), ``appliance up``'s supervisor starts what the registry says is deployed."""
    try:
        deploy.deploy(db, settings, versions[0], "bob")
        before = served(db)["engines"]
        assert deploy.stop_all(db) == [before[0]["pid"]]  # what `appliance down` does
        assert not http_ok(before[0]["url"] + "/health")
        assert deploy.start_deployed(db, settings) == 1
        after = served(db)["engines"]
        assert after[0]["url"] == before[0]["url"] and after[0]["pid"] != before[0]["pid"]
        assert http_ok(after[0]["url"] + "/health")
        assert deploy.start_deployed(db, settings) == 0  # already answering: left alone
    finally:
        deploy.stop_all(db)


async def test_deploy_and_rollback_over_the_admin_api(db: Engine, settings: Settings, versions: list[int]) -> None:
    """The API answers 202 at once; the switch follows once the engines are healthy."""
    admin = admin_headers(settings)
    try:
        async with served_app(settings) as client:
            for version_id in versions:
                accepted = await client.post(f"/admin/models/{version_id}/deploy", headers=admin)
                assert accepted.status_code == 202 and accepted.json()["status"] == "deploying"
                for _ in range(300):
                    shown = (await client.get(f"/admin/models/{version_id}", headers=admin)).json()
                    if shown["serving"]:
                        break
                    await asyncio.sleep(0.1)
                assert shown["state"] == "deployed" and shown["transitions"][-1]["actor"] == "root"
            assert (await client.post("/admin/models/served/team-chat/rollback", headers=admin)).status_code == 202
            for _ in range(300):
                if served(db)["version_id"] == versions[0]:
                    break
                await asyncio.sleep(0.1)
            assert served(db)["version_id"] == versions[0]
    finally:
        deploy.stop_all(db)


def test_a_version_shown_as_serving_is_shown_deployed_whenever_the_switch_commits(
    db: Engine, settings: Settings, versions: list[int]
) -> None:
    """The view reads several rows, each as committed when it runs; a switch committed between any two of them
    must not yield "serving" with the state from before the switch (seen in CI: polled until serving, the
    version still said approved)."""
    engines = [{"name": "e0", "url": "http://127.0.0.1:1", "port": 1, "pid": 0}]
    statements = 0
    k = 0
    while True:
        k += 1
        with Session(db) as session:
            session.exec(delete(ModelTransition).where(col(ModelTransition.action) == "deploy"))
            session.exec(delete(ServedModel))
            session.get(ModelVersion, versions[0]).state = "approved"  # type: ignore[union-attr]
            session.commit()
        seen = 0

        def switch_after_k(*_args: Any) -> None:
            nonlocal seen
            seen += 1
            if seen == k:
                deploy.switch(db, settings, versions[0], engines, FAKE_KIND, "root", "deploy")

        event.listen(db, "after_cursor_execute", switch_after_k)
        try:
            with Session(db) as session:
                shown = service.show(session, versions[0])
        finally:
            event.remove(db, "after_cursor_execute", switch_after_k)
        assert not shown["serving"] or shown["state"] == "deployed", f"torn after statement {k}: {shown}"
        if k == 1:
            statements = seen  # the view's own statements (and the switch's, run inside the first)
        if seen < k:  # the switch never ran: every interleaving was tried
            break
    assert k > 2 and statements > 2


def test_a_crashed_engine_is_started_again_on_its_port(db: Engine, settings: Settings, versions: list[int]) -> None:
    """What ``appliance up``'s supervisor does every second for the registry's engines (systemd does it on a
    node): an engine killed with SIGKILL is noticed, started again after its back-off on the same port, and the
    mapping records the new process."""
    import os
    import signal
    import time

    restarts: dict[str, Any] = {}
    try:
        deploy.deploy(db, settings, versions[0], "bob")
        before = served(db)["engines"][0]
        assert deploy.restart_crashed(db, settings, restarts) == []  # nothing crashed: nothing done
        os.kill(before["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while pid_alive(before["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deploy.restart_crashed(db, settings, restarts) == []  # noticed; started after its back-off
        started: list[str] = []
        while not started and time.monotonic() < deadline:
            time.sleep(0.2)
            started = deploy.restart_crashed(db, settings, restarts)
        after = served(db)["engines"][0]
        assert started == [before["name"]] and after["pid"] != before["pid"] and after["port"] == before["port"]
        while not http_ok(after["url"] + "/health") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http_ok(after["url"] + "/health")
    finally:
        deploy.stop_all(db)


def test_a_crashed_engine_whose_files_changed_is_not_started_again(
    db: Engine, settings: Settings, versions: list[int]
) -> None:
    import os
    import signal
    import time

    restarts: dict[str, Any] = {}
    try:
        deploy.deploy(db, settings, versions[0], "bob")
        before = served(db)["engines"][0]
        with Session(db) as session:
            version = session.get(ModelVersion, versions[0])
            assert version is not None
            (Path(version.path) / "model.safetensors").write_bytes(b"tampered")
        os.kill(before["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert deploy.restart_crashed(db, settings, restarts) == []
            time.sleep(0.2)
        assert served(db)["engines"][0]["pid"] == before["pid"]  # left down, and the log says why
        assert restarts[before["name"]].count == deploy.MAX_RESTARTS  # given up on, not merely not due yet
    finally:
        deploy.stop_all(db)

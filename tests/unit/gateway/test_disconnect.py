"""A client that leaves while the gateway waits for a non-streamed answer: the gateway closes its engine
connection (vLLM aborts a request whose connection is gone) and records the request as the client's leaving,
charged what was reserved (the engine's count is lost with the connection: the reservation bounds it)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn

from appliance.asgi import create_app
from appliance.gateway.routes import unless_client_leaves
from appliance.lib.errors import ClientDisconnectedError, ServiceUnavailableError
from appliance.settings import Settings
from tests.support import fake_engine as fake
from tests.support.gateway import admin_headers, fake_settings


@pytest.fixture
async def served(tmp_path: Path, fake_engine: fake.FakeEngine) -> AsyncIterator[tuple[Settings, str]]:
    """The app behind a real HTTP server (uvicorn), so that a client can really go away."""
    settings = fake_settings(tmp_path, fake_engine)
    port = fake.free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    assert server.started
    try:
        yield settings, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def usage_row(data_dir: Path, request_id: str) -> dict[str, Any] | None:
    connection = sqlite3.connect(data_dir / "appliance.db")
    connection.row_factory = sqlite3.Row
    try:
        row = connection.execute("SELECT * FROM usage_records WHERE request_id = ?", (request_id,)).fetchone()
        return dict(row) if row is not None else None
    finally:
        connection.close()


async def until(check: Any, seconds: float = 5.0) -> Any:
    for _ in range(int(seconds / 0.02)):
        value = check()
        if value:
            return value
        await asyncio.sleep(0.02)
    return check()


@pytest.mark.parametrize("budgeted", [True, False], ids=["budgeted", "unbudgeted"])
async def test_leaving_a_non_streamed_request_aborts_the_engine_and_charges_the_reservation(
    served: tuple[Settings, str], budgeted: bool
) -> None:
    settings, url = served
    admin = admin_headers(settings)
    async with aiohttp.ClientSession(url) as session:
        async with session.post("/admin/tenants", json={"name": "leaver"}, headers=admin) as response:
            tenant = await response.json()
        async with session.post(
            "/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}, headers=admin
        ) as response:
            workflow = await response.json()
        async with session.post("/admin/api-keys", json={"workflow_id": workflow["id"]}, headers=admin) as response:
            key = (await response.json())["key"]
        budget = {"scope_type": "tenant", "scope_id": tenant["id"], "kind": "tokens", "period": "day", "limit": 10_000}
        if budgeted:
            async with session.post("/admin/budgets/", json=budget, headers=admin) as response:
                assert response.status == 201, await response.text()

    body = {"model": "fake", "messages": [{"role": "user", "content": "hang"}], "max_tokens": 50}
    before = len(fake.HANGING)
    client = aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {key}"})
    request = asyncio.create_task(client.post("/v1/chat/completions", json=body))
    assert await until(lambda: len(fake.HANGING) > before), "the engine got the request"
    request_id = fake.HANGING[-1]
    request.cancel()  # the client goes away: its connection is closed
    await client.close()

    assert await until(lambda: request_id in fake.ABANDONED), "the gateway kept the engine working for nobody"
    row = await until(lambda: usage_row(settings.data_dir, request_id))
    assert row is not None
    assert (row["status_code"], row["error_code"], row["client_disconnected"]) == (499, "client_disconnected", 1)
    # charged the reservation: the prompt as counted (one word + 3 for the template) and the whole cap
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 50)
    if budgeted:  # the budget settles at the same figures (its settlement runs in the background)
        async with aiohttp.ClientSession(url) as session:
            for _ in range(100):
                async with session.get("/admin/budgets/", headers=admin) as response:
                    [shown] = (await response.json())["data"]
                if shown["reserved"] == 0:
                    break
                await asyncio.sleep(0.05)
        assert (shown["used"], shown["reserved"]) == (54, 0), shown


class _Connection:
    """What ``unless_client_leaves`` reads of a request: ``receive``, which returns the disconnect when told."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_the_work_runs_to_its_result_and_leaves_no_watcher_behind() -> None:
    connection = _Connection()
    before = len(asyncio.all_tasks())
    assert await unless_client_leaves(connection, asyncio.sleep(0.01, "answer")) == "answer"  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before


async def test_a_client_leaving_cancels_the_work_and_is_told_apart_from_a_server_cancelling_it() -> None:
    connection, cancelled = _Connection(), asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()  # its clean-up runs (serving closes the engine connection here)
            raise
        return "never"

    asyncio.get_running_loop().call_later(0.05, connection.gone.set)
    with pytest.raises(ClientDisconnectedError):
        await unless_client_leaves(connection, work())  # type: ignore[arg-type]
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    # The server cancelling the request (shutting down) stays a cancellation, even if the client then leaves.
    connection, cancelled = _Connection(), asyncio.Event()
    request = asyncio.ensure_future(unless_client_leaves(connection, work()))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    request.cancel()
    connection.gone.set()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert cancelled.is_set()


async def test_a_leaving_whose_cancellation_the_work_swallowed_leaves_the_task_uncancelled() -> None:
    """``asyncio.wait_for`` returns its result, swallowing a cancellation, when its future is done in the same
    turn: the answer is returned, and the request's task is not left marked as being cancelled."""
    connection = _Connection()

    async def work() -> str:
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def both() -> None:  # what it waits for is done, and the client leaves, in one turn of the loop
            ready.set_result("answer")
            connection.gone.set()

        asyncio.get_running_loop().call_soon(both)
        return await asyncio.wait_for(ready, 5)

    assert await unless_client_leaves(connection, work()) == "answer"  # type: ignore[arg-type]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancelled_wait_inside_the_work_is_an_interruption_not_a_client_leaving() -> None:
    async def work() -> str:
        inner = asyncio.ensure_future(asyncio.sleep(30))
        asyncio.get_running_loop().call_later(0.01, inner.cancel)
        await inner
        return "never"

    with pytest.raises(ServiceUnavailableError):
        await unless_client_leaves(_Connection(), work())  # type: ignore[arg-type]

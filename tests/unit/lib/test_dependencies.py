"""Route dependencies are resolved in the handler's own task (appliance/lib/dependencies.py): no task per
dependency, the values and their order as before, and only synchronous providers on the app, which is what makes
resolving them in turn free."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from litestar import Litestar, get
from litestar.di import NamedDependency, Provide
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.lib.dependencies import resolve_in_order
from appliance.settings import Settings

seen: list[tuple[str, asyncio.Task[Any] | None]] = []


def _provider(name: str) -> Provide:
    def provide() -> str:
        seen.append((name, asyncio.current_task()))
        return name

    return Provide(provide, sync_to_thread=False)


def _combined(first: NamedDependency[str], second: NamedDependency[str]) -> str:
    seen.append(("combined", asyncio.current_task()))
    return f"{first}+{second}"


@get("/three")
async def three(first: NamedDependency[str], second: NamedDependency[str], combined: NamedDependency[str]) -> dict:
    return {"first": first, "second": second, "combined": combined, "task": id(asyncio.current_task())}


async def test_dependencies_are_resolved_in_the_handlers_task_and_in_the_order_of_their_levels() -> None:
    resolve_in_order()
    seen.clear()
    app = Litestar(
        [three],
        dependencies={
            "first": _provider("first"),
            "second": _provider("second"),
            "combined": Provide(_combined, sync_to_thread=False),
        },
    )
    async with AsyncTestClient(app=app) as client:
        body = (await client.get("/three")).json()
    assert body["first"] == "first" and body["second"] == "second" and body["combined"] == "first+second"
    assert [name for name, _ in seen][-1] == "combined"  # after what it depends on
    tasks = {id(task) for _, task in seen}
    assert tasks == {body["task"]}, "a dependency was resolved in a task of its own"


async def test_a_dependency_that_raises_fails_the_request_with_its_own_error() -> None:
    resolve_in_order()

    def broken() -> str:
        raise ValueError("no")

    @get("/broken")
    async def handler(first: NamedDependency[str], broken: NamedDependency[str]) -> str:
        return first + broken

    app = Litestar(
        [handler],
        dependencies={"first": _provider("first"), "broken": Provide(broken, sync_to_thread=False)},
        debug=False,
    )
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/broken")).status_code == 500


def test_every_provider_of_the_appliance_is_synchronous(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    for name, provide in app.dependencies.items():
        assert provide.has_sync_callable, f"dependency {name} awaits: resolving it in turn may wait for it"
        assert not provide.sync_to_thread, f"dependency {name} runs on a thread: resolving it in turn may wait"

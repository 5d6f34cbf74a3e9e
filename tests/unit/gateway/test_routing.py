"""Choosing an engine when several serve one model: chat sessions stay on their engine, new work goes to the
least loaded one, and an engine that refused a connection is passed over for a moment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.lib.errors import ModelNotFoundError
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine, free_port
from tests.support.gateway import add_tenant
from tests.unit.gateway.test_app import chat, user_token, wait_rows


def gateway(*urls: str, **options: Any) -> GatewaySettings:
    return GatewaySettings(routes=[EngineRoute(model="m", url=url) for url in urls], **options)


def router_with_clock(settings: GatewaySettings) -> tuple[Any, list[float]]:
    from appliance.gateway.upstream import EngineRouter

    now = [0.0]
    return EngineRouter(settings, clock=lambda: now[0]), now


def test_engines_of_one_model_get_names_and_unknown_models_are_refused() -> None:
    settings = gateway("http://h:1", "http://h:2")
    assert [route.key for route in settings.routes] == ["m@h:1", "m@h:2"]
    router, _now = router_with_clock(settings)
    with pytest.raises(ModelNotFoundError):
        router.route("other")
    with pytest.raises(ValueError, match="same model"):
        gateway("http://h:1", "http://h:1")


def test_a_session_stays_on_its_engine_and_new_work_goes_to_the_least_loaded() -> None:
    router, now = router_with_clock(gateway("http://h:1", "http://h:2", session_affinity_ttl_s=60))
    first = router.route("m", "s1", "t")
    lease = router.lease(first)  # s1's engine is now busier
    assert router.route("m", "s1", "t").url == first.url, "affinity beats load"
    other = router.route("m", "s2", "t")
    assert other.url != first.url, "a new session goes to the idle engine"
    assert router.route("m", "s1", "another-tenant").url == other.url, "sessions are per tenant"
    assert router.load() == {
        "m@h:1": 1 if first.url.endswith(":1") else 0,
        "m@h:2": 1 if first.url.endswith(":2") else 0,
    }
    lease.release()
    lease.release()  # once only
    assert sum(router.load().values()) == 0
    now[0] = 61
    router.lease(other)
    assert router.route("m", "s1", "t").url == first.url, "an expired session is placed again: least loaded"


def test_without_a_session_equal_load_alternates() -> None:
    router, _now = router_with_clock(gateway("http://h:1", "http://h:2", "http://h:3"))
    assert len({router.route("m").url for _ in range(3)}) == 3


def test_the_remembered_sessions_are_bounded() -> None:
    router, _now = router_with_clock(gateway("http://h:1", "http://h:2", session_affinity_entries=2))
    for session in ("a", "b", "c"):
        router.route("m", session)
    assert len(router._affinity) == 2


@pytest.fixture
def two_engines() -> Iterator[tuple[FakeEngine, FakeEngine]]:
    engines = (FakeEngine(), FakeEngine())
    for engine in engines:
        engine.start()
    yield engines
    for engine in engines:
        engine.stop()


async def test_sessions_through_the_gateway_and_an_engine_that_goes_away(
    tmp_path: Path, two_engines: tuple[FakeEngine, FakeEngine]
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    settings = Settings(data_dir=tmp_path, gateway=gateway(two_engines[0].url, two_engines[1].url, down))
    add_tenant(settings, "t1")  # the tenant of the token
    async with AsyncTestClient(app=create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {user_token(settings)}"
        statuses = []
        for turn in range(6):
            for session in ("alpha", "beta"):
                response = await client.post(
                    "/v1/chat/completions",
                    json=dict(chat(f"turn {turn}"), model="m"),
                    headers={"X-Session-Id": session},
                )
                statuses.append(response.status_code)
        rows = await wait_rows(tmp_path, 12)
    by_session: dict[str, set[str]] = {}
    for row, session in zip(rows, ["alpha", "beta"] * 6, strict=True):
        by_session.setdefault(session, set()).add(row["engine"])
    # A session that first landed on the dead engine got one 503 and then moved, for good, to a live one.
    assert statuses.count(503) <= 2
    for session, engines in by_session.items():
        live = engines - {f"m@{down.split('://')[1]}"}
        assert len(live) == 1, (session, engines)
    assert all(row["engine"] for row in rows)


async def test_an_engine_whose_connections_are_all_in_use_is_busy_not_down(fake_engine: FakeEngine) -> None:
    """Every pooled connection held by a request in flight: the next request is refused after the connect timeout
    with 503 ``engine_busy`` (not ``engine_unavailable``), and the engine's health check does not wait for one."""
    from appliance.gateway.upstream import EngineRouter
    from appliance.lib.errors import EngineUnavailableError

    router = EngineRouter(gateway(fake_engine.url, pool_size=1, connect_timeout_s=0.2))
    await router.start()
    try:
        route = router.route("m")
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
        held = await router.open(route, "/v1/chat/completions", body, "req_held")
        with pytest.raises(EngineUnavailableError) as refused:
            await router.open(route, "/v1/chat/completions", body, "req_waiting")
        assert refused.value.code == "engine_busy"
        assert (await router.health(route)).healthy
        held.release()
        answer = await router.open(route, "/v1/chat/completions", body, "req_next")
        answer.release()
    finally:
        await router.stop()

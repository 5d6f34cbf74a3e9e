"""The gateway's HTTP behaviour where no real engine is needed: routing errors, failure mapping, the
request id. Engine failures that the real vLLM cannot be made to produce use the fake engine."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, ServerSettings, Settings
from tests.support.fake_engine import FakeEngine, free_port
from tests.support.gateway import add_tenant


@pytest.fixture
async def client(tmp_path: Path, fake_engine: FakeEngine) -> AsyncIterator[AsyncTestClient[Any]]:
    settings = Settings(
        data_dir=tmp_path,
        server=ServerSettings(max_body_bytes=64 * 1024),
        gateway=GatewaySettings(
            routes=[
                EngineRoute(model="fake", url=fake_engine.url),
                EngineRoute(model="down", url=f"http://127.0.0.1:{free_port()}"),
                EngineRoute(model="embed", url=fake_engine.url, runner="pooling"),
            ]
        ),
    )
    add_tenant(settings, "t1")
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {user_token(settings)}"
        yield test_client


def user_token(settings: Settings) -> str:
    return embedded_issuer(settings).mint("tester", client_id="appliance-console", roles=["user"], tenant_id="t1")


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": content}], **extra}


def usage_rows(tmp_path: Path) -> list[dict[str, Any]]:
    connection = sqlite3.connect(tmp_path / "appliance.db")
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM usage_records ORDER BY id")]
    finally:
        connection.close()


async def wait_rows(tmp_path: Path, count: int) -> list[dict[str, Any]]:
    for _ in range(100):
        rows = usage_rows(tmp_path)
        if len(rows) >= count:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} usage rows, found {len(usage_rows(tmp_path))}")


def assert_envelope(body: dict[str, Any], *, type_: str, code: str | None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_every_response_carries_a_request_id(client: AsyncTestClient[Any]) -> None:
    ids = set()
    for response in (
        await client.get("/healthz"),
        await client.get("/no/such/route"),
        await client.post("/v1/chat/completions", content=b"{bad"),
        await client.post("/v1/chat/completions", json=chat("hello")),
    ):
        assert response.headers["x-request-id"].startswith("req_")
        ids.add(response.headers["x-request-id"])
    assert len(ids) == 4
    # the answer itself (sent as its bytes, not through Litestar's Response): typed and framed
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["x-request-cost"].split()[0].replace(".", "").isdigit()
    # a stream says it is one (clients such as httpx-sse refuse an event stream typed as JSON)
    streamed = await client.post("/v1/chat/completions", json=chat("hello", stream=True))
    assert streamed.status_code == 200
    assert streamed.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert streamed.headers.get_list("content-type") == ["text/event-stream; charset=utf-8"]


async def test_unknown_route_and_method_get_the_envelope_naming_them(client: AsyncTestClient[Any]) -> None:
    response = await client.post("/v1/audio/speech", json={"model": "m", "input": "hi"})
    assert response.status_code == 404
    assert_envelope(response.json(), type_="invalid_request_error", code="unknown_route")
    assert "POST /v1/audio/speech" in response.json()["error"]["message"]
    response = await client.get("/v1/chat/completions")
    assert response.status_code == 405
    assert_envelope(response.json(), type_="invalid_request_error", code="method_not_allowed")
    assert response.json()["error"]["message"] == "Method GET is not allowed on /v1/chat/completions."


async def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_404(client: AsyncTestClient[Any]) -> None:
    listed = (await client.get("/v1/models")).json()["data"]
    assert [row["id"] for row in listed] == ["fake", "down", "embed"]
    response = await client.get("/v1/models/embed")
    assert response.status_code == 200 and response.json() == listed[2]
    response = await client.get("/v1/models/no-such-model")
    assert response.status_code == 404
    assert_envelope(response.json(), type_="invalid_request_error", code="model_not_found")
    assert (await client.get("/v1/models/embed", headers={"Authorization": "Bearer nope"})).status_code == 401


async def test_body_over_the_limit_is_413(client: AsyncTestClient[Any], tmp_path: Path) -> None:
    response = await client.post("/v1/chat/completions", json=chat("x" * 100_000))
    assert response.status_code == 413
    assert_envelope(response.json(), type_="invalid_request_error", code="request_too_large")


async def test_engine_down_is_503_and_recorded(client: AsyncTestClient[Any], tmp_path: Path) -> None:
    response = await client.post("/v1/chat/completions", json=dict(chat("hi"), model="down"))
    assert response.status_code == 503
    assert_envelope(response.json(), type_="service_unavailable", code="engine_unavailable")
    [row] = await wait_rows(tmp_path, 1)
    assert (row["status_code"], row["error_code"], row["model"]) == (503, "engine_unavailable", "down")
    assert (row["tenant_id"], row["subject"]) == ("t1", "tester")
    assert row["request_id"] == response.headers["x-request-id"]


async def test_engine_5xx_is_502(client: AsyncTestClient[Any]) -> None:
    response = await client.post("/v1/chat/completions", json=chat("fail:500"))
    assert response.status_code == 502
    assert_envelope(response.json(), type_="upstream_error", code="engine_error")
    assert "engine exploded" in response.json()["error"]["message"]


async def test_engine_invalid_json_is_502(client: AsyncTestClient[Any]) -> None:
    response = await client.post("/v1/chat/completions", json=chat("fail:badjson"))
    assert response.status_code == 502
    assert_envelope(response.json(), type_="upstream_error", code="engine_error")


async def test_engine_4xx_is_passed_on_with_its_message(client: AsyncTestClient[Any]) -> None:
    response = await client.post("/v1/chat/completions", json=chat("fail:400"))
    assert response.status_code == 400
    body = response.json()
    assert_envelope(body, type_="invalid_request_error", code="invalid_request")
    assert body["error"]["message"] == "max_tokens is too large"
    assert body["error"]["param"] == "max_tokens"


async def test_stream_cut_off_by_the_engine_ends_with_an_error_event(
    client: AsyncTestClient[Any], tmp_path: Path
) -> None:
    response = await client.post("/v1/chat/completions", json=chat("fail:truncate", stream=True))
    assert response.status_code == 200
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1].startswith('data: {"error"')
    assert "[DONE]" not in response.text
    [row] = await wait_rows(tmp_path, 1)
    assert (row["status_code"], row["error_code"], row["completion_tokens"]) == (502, "engine_error", 2)


async def test_embedding_model_refuses_chat(client: AsyncTestClient[Any]) -> None:
    response = await client.post("/v1/chat/completions", json=dict(chat("hi"), model="embed"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_supported"


async def test_readyz_is_503_while_an_engine_is_down(client: AsyncTestClient[Any], tmp_path: Path) -> None:
    admin = embedded_issuer(Settings(data_dir=tmp_path)).mint("root", client_id="c", roles=["operator"])
    response = await client.get("/readyz", headers={"Authorization": f"Bearer {admin}"})
    assert response.status_code == 503
    engines = {row["model"]: row["healthy"] for row in response.json()["engines"]}
    assert engines == {"fake": True, "down": False, "embed": True}
    assert response.json()["database"]["healthy"] is True


async def test_usage_rows_are_flushed_on_shutdown(tmp_path: Path, fake_engine: FakeEngine) -> None:
    settings = Settings(
        data_dir=tmp_path, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)])
    )
    settings.usage.flush_interval_s = 60.0  # nothing is written before shutdown unless shutdown flushes
    add_tenant(settings, "t1")
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        test_client.headers["Authorization"] = f"Bearer {user_token(settings)}"
        for _ in range(5):
            assert (await test_client.post("/v1/chat/completions", json=chat("hi"))).status_code == 200
    rows = usage_rows(tmp_path)
    assert len(rows) == 5
    assert all(row["completion_tokens"] == 4 and row["prompt_tokens"] == 5 for row in rows)


async def test_usage_rows_say_why_generation_ended(client: AsyncTestClient[Any], tmp_path: Path) -> None:
    """`length` when an answer was cut off by its cap (streamed or not), `stop` when it ended by itself; a refused
    request has none. Drift follows the truncation rate from these."""
    for extra in (
        {"max_tokens": 2},
        {"max_tokens": 50},
        {"max_tokens": 2, "stream": True},
        {"max_tokens": 50, "stream": True},
    ):
        response = await client.post("/v1/chat/completions", json=chat("why did it end", **extra))
        assert response.status_code == 200
        await response.aread()
    assert (await client.post("/v1/chat/completions", json=chat("x", n=0))).status_code == 400
    rows = await wait_rows(tmp_path, 4)
    assert [row["finish_reason"] for row in rows[:4]] == ["length", "stop", "length", "stop"]


async def test_usage_rows_record_the_context_length_they_were_served_with(
    client: AsyncTestClient[Any], tmp_path: Path
) -> None:
    """The engine's context length (its /tokenize answers carry it) lands in every row it served, streamed or
    not, so drift can follow context utilisation; a request refused before any engine counted it has none."""
    assert (await client.post("/v1/chat/completions", json=chat("x", n=0))).status_code == 400
    for extra in ({}, {"stream": True}):
        response = await client.post("/v1/chat/completions", json=chat("how long is the context", **extra))
        assert response.status_code == 200
        await response.aread()
    rows = await wait_rows(tmp_path, 2)
    answered = [row for row in rows if row["status_code"] == 200]
    assert [row["context_length"] for row in answered] == [8192, 8192]
    assert all(row["context_length"] is None for row in rows if row["status_code"] == 400)

"""The stream relay's bookkeeping, against the fake engine (a real HTTP stream, a fake producer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from appliance.audit.chain import NoteKey
from appliance.audit.store import AuditStore
from appliance.audit.writer import AuditWriter
from appliance.db.engine import create_schema, make_engine
from appliance.gateway.settlement import Settlement, Source
from appliance.gateway.streaming import StreamRelay
from appliance.gateway.upstream import EngineRouter
from appliance.gateway.usage import UPSTREAM_STREAM_OPTIONS, StreamUsage
from appliance.ledger.writer import UsageEvent, UsageWriter
from appliance.settings import EngineRoute, GatewaySettings
from tests.support.fake_engine import FakeEngine


@pytest.fixture
async def router(fake_engine: FakeEngine) -> AsyncIterator[EngineRouter]:
    router = EngineRouter(GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)]))
    await router.start()
    yield router
    await router.stop()


@pytest.fixture
async def writer(tmp_path: Path) -> AsyncIterator[UsageWriter]:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    create_schema(engine)
    writer = UsageWriter(engine, capacity=4, flush_interval_s=0.01)
    await writer.start()
    yield writer
    await writer.stop()


async def open_relay(router: EngineRouter, writer: UsageWriter, content: str = "hi") -> tuple[StreamRelay, UsageEvent]:
    route = router.route("fake")
    body = {"model": "fake", "messages": [{"role": "user", "content": content}], "stream": True}
    response = await router.open(
        route, "/v1/chat/completions", msgspec.json.encode(dict(body, stream_options=UPSTREAM_STREAM_OPTIONS)), "r1"
    )
    event = UsageEvent(request_id="r1", model="fake", endpoint="/v1/chat/completions", status_code=0, streamed=True)
    usage = StreamUsage(client_include=False, client_continuous=False, started_at=time.perf_counter())
    record = Settlement(await writer.acquire(), None, Source(), "api_key")
    return StreamRelay(route, response, usage, record, event), event


async def test_client_gone_before_the_first_chunk_still_records_and_closes(
    router: EngineRouter, writer: UsageWriter
) -> None:
    relay, event = await open_relay(router, writer)
    await relay.aclose()  # never iterated: what Litestar's background task does when the client left early
    assert event.client_disconnected and event.status_code == 200
    assert writer.pending == 1
    await relay.aclose()  # idempotent
    assert writer.pending == 1


async def test_client_gone_mid_stream_records_the_tokens_so_far(router: EngineRouter, writer: UsageWriter) -> None:
    relay, event = await open_relay(router, writer)
    iterator = aiter(relay)
    await anext(iterator)
    await anext(iterator)
    await relay.aclose()
    assert event.client_disconnected and event.completion_tokens == 2


async def test_complete_stream_is_recorded_once_as_finished(router: EngineRouter, writer: UsageWriter) -> None:
    relay, event = await open_relay(router, writer)
    chunks = [chunk async for chunk in relay]
    await relay.aclose()
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert not event.client_disconnected and event.completion_tokens == 4 and event.prompt_tokens == 5
    assert writer.pending + writer.written == 1


async def test_a_stream_whose_records_cannot_be_written_ends_with_an_error_event_not_its_end(
    router: EngineRouter, writer: UsageWriter, tmp_path: Path
) -> None:
    """The answer is released only once its audit record is durable: here the audit log's database has no tables
    (every append fails and is retried), so the stream ends with a 503 error event in the OpenAI envelope, without
    its usage chunk and ``[DONE]``."""
    database = make_engine(f"sqlite:///{tmp_path / 'no-tables.db'}", serialized_writes=True)
    store = AuditStore(
        database,
        NoteKey.load_or_create(tmp_path / "key", "test-node"),
        latest_checkpoint_file=tmp_path / "latest",
    )
    audit = AuditWriter(store, timeout_s=0.3)
    await audit.start()
    try:
        route = router.route("fake")
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        response = await router.open(
            route, "/v1/chat/completions", msgspec.json.encode(dict(body, stream_options=UPSTREAM_STREAM_OPTIONS)), "r2"
        )
        event = UsageEvent(request_id="r2", model="fake", endpoint="/v1/chat/completions", status_code=0, streamed=True)
        usage = StreamUsage(client_include=False, client_continuous=False, started_at=time.perf_counter())
        relay = StreamRelay(
            route, response, usage, Settlement(await writer.acquire(), audit, Source(), "api_key"), event
        )
        chunks = [chunk async for chunk in relay]
        await relay.aclose()
    finally:
        create_schema(database)  # the log can take records again: the one retried is written, and it stops
        await audit.stop()
    assert b"[DONE]" not in b"".join(chunks)
    error = msgspec.json.decode(chunks[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "audit_unavailable" and error["type"] == "service_unavailable"

"""Every log line of a request carries its request id, route, trace id, tenant and workflow; a client's W3C
traceparent reaches the engine under the same trace (a new one is started when it is absent or malformed)."""

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.lib.logging import ContextFilter, JsonFormatter, bind, reset_context
from appliance.lib.tracing import parse_traceparent
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support import fake_engine as fake
from tests.support.fake_engine import FakeEngine, free_port
from tests.support.gateway import add_tenant

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """JSON log lines of the appliance's loggers while the test runs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("appliance")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_a_log_line_is_one_json_object_with_the_bound_context(lines: io.StringIO) -> None:
    reset_context()
    bind(request_id="req_1", route="POST /v1/chat/completions", tenant="t1", workflow=None)
    logging.getLogger("appliance.test").warning("engine %s slow", "e1")
    line = json.loads(lines.getvalue().splitlines()[-1])
    assert line["message"] == "engine e1 slow" and line["level"] == "warning"
    assert (line["request_id"], line["route"], line["tenant"]) == ("req_1", "POST /v1/chat/completions", "t1")
    assert "workflow" not in line


def test_traceparent_parsing_follows_the_specification() -> None:
    kept = parse_traceparent(TRACE)
    assert (kept.trace_id, kept.parent_id, kept.flags) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    for bad in (None, "", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "01-abc", TRACE + "-extra"):
        fresh = parse_traceparent(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", fresh.trace_id) and fresh.parent_id is None
    assert re.fullmatch(r"00-4bf92f3577b34da6a3ce929d0e0e4736-[0-9a-f]{16}-01", kept.child())


async def test_a_request_logs_its_context_and_forwards_its_trace(
    tmp_path: Path, fake_engine: FakeEngine, lines: io.StringIO
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(
            routes=[
                EngineRoute(model="fake", url=fake_engine.url),
                EngineRoute(model="down", url=f"http://127.0.0.1:{free_port()}"),
            ]
        ),
    )
    add_tenant(settings, "t1")  # a token's tenant must exist
    token = embedded_issuer(settings).mint("app", client_id="appliance-console", roles=["user"], tenant_id="t1")
    headers = {"Authorization": f"Bearer {token}", "traceparent": TRACE}
    async with AsyncTestClient(app=create_app(settings)) as client:
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
        answered = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert answered.status_code == 200
        forwarded = fake.TRACEPARENTS_SERVED[-1]
        assert forwarded is not None and forwarded.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        assert forwarded != TRACE, "the gateway's own span is the engine call's parent"
        await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
        assert parse_traceparent(fake.TRACEPARENTS_SERVED[-1]).parent_id is not None, "a new trace was started"
        refused = await client.post("/v1/chat/completions", json={**body, "model": "down"}, headers=headers)
        assert refused.status_code == 503
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    down = [line for line in logged if "EngineUnavailableError" in line["message"]]
    assert down, logged
    assert down[-1]["request_id"] == refused.headers["x-request-id"]
    assert down[-1]["route"] == "POST /v1/chat/completions" and down[-1]["tenant"] == "t1"
    assert down[-1]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"

"""OpenTelemetry export of request spans (OTLP/HTTP, JSON) to a real local receiver: one span per /v1 request,
in the client's trace, with the caller's span as parent, the gateway's span as the engine call's parent, and the
tenant, workflow and route; nothing sent when export is off, when the trace is not sampled, or when the collector
is not on the site network."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

import tests.support.fake_engine as fake
from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings, TracingSettings
from appliance.telemetry.otlp import NotOnSiteNetworkError, SpanExporter, check_endpoint, on_site_network
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import add_tenant

TRACE_ID, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


class Receiver:
    """An OTLP/HTTP endpoint on loopback, in a thread of its own (the test client blocks its loop while the
    gateway shuts down and flushes), that keeps every export request's JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                assert self.path == "/v1/traces" and self.headers["content-type"] == "application/json"
                bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    @property
    def spans(self) -> list[dict[str, Any]]:
        return [
            span
            for body in self.bodies
            for resource in body["resourceSpans"]
            for scope in resource["scopeSpans"]
            for span in scope["spans"]
        ]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    thread = threading.Thread(target=found.server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()
    thread.join(10)


async def serve(
    tmp_path: Path, engine: FakeEngine, tracing: TracingSettings, traceparent: str = TRACEPARENT
) -> SpanExporter:
    """Two /v1 requests (one streamed) and one request outside /v1, then the gateway stops (its spans flushed);
    returns its exporter."""
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=engine.url)]),
        tracing=tracing,
    )
    add_tenant(settings, "t1")
    token = embedded_issuer(settings).mint(
        "app", client_id="appliance-console", roles=["user"], tenant_id="t1", extra={"workflow": "wf-1"}
    )
    headers = {"Authorization": f"Bearer {token}", "traceparent": traceparent}
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    app = create_app(settings)
    async with AsyncTestClient(app=app) as client:
        assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status_code == 200
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True}, headers=headers)
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert (await client.get("/healthz", headers=headers)).status_code == 200
    exporter: SpanExporter = app.state.spans
    return exporter


def site(receiver: Receiver, **extra: Any) -> TracingSettings:
    return TracingSettings.model_validate(
        {"otlp_enabled": True, "otlp_endpoint": receiver.url, "site_networks": ["127.0.0.0/8"], **extra}
    )


async def test_one_span_per_v1_request_in_the_clients_trace(
    tmp_path: Path, fake_engine: FakeEngine, receiver: Receiver
) -> None:
    served_before = len(fake.TRACEPARENTS_SERVED)
    exporter = await serve(tmp_path, fake_engine, site(receiver, flush_interval_s=0.05))
    spans = receiver.spans
    assert (exporter.sent, exporter.dropped) == (2, 0), (len(spans), len(exporter._queue))
    assert len(spans) == 2, "one per /v1 request, none for /healthz"
    resource = receiver.bodies[0]["resourceSpans"][0]["resource"]["attributes"]
    assert {"key": "service.name", "value": {"stringValue": "appliance-gateway"}} in resource
    for span in spans:
        attributes = {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}
        assert span["traceId"] == TRACE_ID and span["parentSpanId"] == CALLER_SPAN
        assert span["name"] == "POST /v1/chat/completions" and span["kind"] == 2
        assert int(span["endTimeUnixNano"]) > int(span["startTimeUnixNano"])
        assert attributes["appliance.tenant"] == "t1" and attributes["appliance.workflow"] == "wf-1"
        assert attributes["http.route"] == "/v1/chat/completions" and attributes["http.response.status_code"] == "200"
        assert attributes["appliance.request_id"].startswith("req_")
    assert spans[0]["spanId"] != spans[1]["spanId"]
    # The engine calls of each request name that request's span as their parent.
    parents = {value.split("-")[2] for value in fake.TRACEPARENTS_SERVED[served_before:] if value}
    assert parents == {span["spanId"] for span in spans}


async def test_nothing_is_sent_when_export_is_off_or_the_trace_is_not_sampled(
    tmp_path: Path, fake_engine: FakeEngine, receiver: Receiver
) -> None:
    off = TracingSettings(otlp_enabled=False, otlp_endpoint=receiver.url, site_networks=["127.0.0.0/8"])
    assert (await serve(tmp_path / "off", fake_engine, off)).sent == 0
    unsampled = f"00-{TRACE_ID}-{CALLER_SPAN}-00"
    assert (await serve(tmp_path / "unsampled", fake_engine, site(receiver), traceparent=unsampled)).sent == 0
    assert receiver.bodies == []


async def test_nothing_is_sent_to_a_collector_off_the_site_network(
    tmp_path: Path, fake_engine: FakeEngine, receiver: Receiver
) -> None:
    """The receiver listens on loopback, but the site network is another one: its address is refused."""
    exporter = await serve(tmp_path, fake_engine, site(receiver, site_networks=["192.168.77.0/24"]))
    assert receiver.bodies == []
    assert (exporter.sent, exporter.dropped) == (0, 2)


async def test_public_addresses_are_never_a_collector() -> None:
    assert on_site_network("10.1.2.3", []) and on_site_network("127.0.0.1", []) and on_site_network("fd00::1", [])
    assert not on_site_network("8.8.8.8", []) and not on_site_network("2001:4860:4860::8888", [])
    assert not on_site_network("224.0.0.1", []) and not on_site_network("0.0.0.0", [])
    assert on_site_network("192.168.77.9", ["192.168.77.0/24"]) and not on_site_network("10.0.0.1", ["192.168.77.0/24"])
    with pytest.raises(NotOnSiteNetworkError, match=r"8\.8\.8\.8"):
        await check_endpoint("http://8.8.8.8:4318/v1/traces", [])  # an address literal: refused without a lookup
    await check_endpoint("http://localhost:4318/v1/traces", [])


def test_export_needs_an_endpoint_and_site_networks_must_be_cidrs() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint"):
        TracingSettings(otlp_enabled=True)
    with pytest.raises(ValueError):
        TracingSettings(site_networks=["not a network"])
    with pytest.raises(ValueError, match="http"):
        TracingSettings(otlp_endpoint="ftp://collector/v1/traces")

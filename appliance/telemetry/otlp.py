"""Optional OpenTelemetry export of the gateway's request spans: one span per ``/v1`` request, sent in batches to a
collector on the site network over OTLP/HTTP with JSON bodies (the protocol's ``application/json`` encoding; no
SDK needed on the offline media).

A span carries the request's trace (the client's ``traceparent``, or the one started for it), the gateway's own
span id (the parent of its engine calls, :mod:`appliance.lib.tracing`), the caller's span as its parent, and the
attributes ``appliance.tenant``, ``appliance.workflow``, ``http.route``, ``http.request.method``,
``http.response.status_code`` and ``appliance.request_id`` (tenant and workflow once authenticated). Requests whose
trace is not sampled (flags without bit 0) are not exported.

Sovereignty: before each export the collector's host is resolved and every address must be on the site network
(:func:`on_site_network`); otherwise nothing is sent and the batch is dropped with an error in the log. A slow or
absent collector never slows requests: spans wait in a bounded queue, the oldest dropped when it is full.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.lib.logging import context
from appliance.settings import TracingSettings

log = logging.getLogger(__name__)

SPAN_KIND_SERVER = 2
STATUS_UNSET, STATUS_ERROR = 0, 2
TRACED_PREFIX = "/v1/"


class NotOnSiteNetworkError(Exception):
    """The collector's address is not on the site network: nothing is sent to it."""


def on_site_network(address: str, site_networks: Sequence[str]) -> bool:
    """Whether the appliance may send to ``address``: inside one of ``site_networks`` when they are given, else
    any address that is not public (loopback, private, link-local, shared). Never multicast or unspecified."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_multicast or ip.is_unspecified:
        return False
    if site_networks:
        return any(ip in ipaddress.ip_network(cidr, strict=False) for cidr in site_networks)
    return not ip.is_global


async def check_endpoint(endpoint: str, site_networks: Sequence[str]) -> None:
    """Resolve the endpoint's host; raise :class:`NotOnSiteNetworkError` unless every address is allowed."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise NotOnSiteNetworkError(f"the collector host {host!r} does not resolve: {exc}") from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    refused = [address for address in addresses if not on_site_network(address, site_networks)]
    if not addresses or refused:
        raise NotOnSiteNetworkError(
            f"the collector {host!r} resolves to {', '.join(refused or addresses)}, not on the site network"
        )


@dataclass(frozen=True, slots=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    status_code: int
    attributes: dict[str, str | int]

    def encode(self) -> dict[str, Any]:
        span: dict[str, Any] = {
            "traceId": self.trace_id,
            "spanId": self.span_id,
            "name": self.name,
            "kind": SPAN_KIND_SERVER,
            "startTimeUnixNano": str(self.start_ns),
            "endTimeUnixNano": str(self.end_ns),
            "attributes": [_attribute(key, value) for key, value in self.attributes.items()],
            "status": {"code": STATUS_ERROR if self.status_code >= 500 else STATUS_UNSET},
        }
        if self.parent_span_id:
            span["parentSpanId"] = self.parent_span_id
        return span


def _attribute(key: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


class SpanExporter:
    """Queues finished spans and sends them in batches; :meth:`record` never blocks or fails."""

    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        self._queue: deque[Span] = deque(maxlen=settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self.sent = 0  # spans the collector accepted
        self.dropped = 0  # spans lost: queue full, collector refused or not on the site network

    @property
    def enabled(self) -> bool:
        return self.settings.otlp_enabled and self.settings.otlp_endpoint is not None

    def record(self, span: Span) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(span)

    async def start(self) -> None:
        if not self.enabled:
            return
        try:
            await check_endpoint(str(self.settings.otlp_endpoint), self.settings.site_networks)
        except NotOnSiteNetworkError as exc:
            log.error("OpenTelemetry export: %s; no span will be sent there", exc)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        self._task = asyncio.create_task(self._run(), name="otlp-export")

    async def stop(self) -> None:
        """Let a send in progress finish, send what the last requests left, close."""
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None
        if self._session is not None:
            try:
                await self.flush()
            finally:
                await self._session.close()
                self._session = None

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.settings.flush_interval_s)
            except TimeoutError:
                pass
            try:
                await self.flush()
            except Exception:
                log.exception("OpenTelemetry export failed; its spans are dropped")

    async def flush(self) -> None:
        while self._queue and self._session is not None:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.settings.batch_size))]
            if not await self._send(batch):
                self.dropped += len(batch)

    async def _send(self, batch: list[Span]) -> bool:
        assert self._session is not None and self.settings.otlp_endpoint is not None
        endpoint = self.settings.otlp_endpoint
        try:
            await check_endpoint(endpoint, self.settings.site_networks)  # each time: DNS may have changed
        except NotOnSiteNetworkError as exc:
            log.error("OpenTelemetry export refused: %s", exc)
            return False
        body = msgspec.json.encode(self._payload(batch))
        try:
            async with self._session.post(
                endpoint, data=body, headers={"Content-Type": "application/json"}, allow_redirects=False
            ) as response:
                if response.status >= 300:
                    log.warning("the OpenTelemetry collector answered %d to %d spans", response.status, len(batch))
                    return False
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("the OpenTelemetry collector at %s is not reachable: %s", endpoint, exc)
            return False
        self.sent += len(batch)
        return True

    def _payload(self, batch: list[Span]) -> dict[str, Any]:
        resource = {"attributes": [_attribute("service.name", self.settings.service_name)]}
        scope = {"name": "appliance.gateway"}
        spans = [span.encode() for span in batch]
        return {"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": scope, "spans": spans}]}]}


def span_middleware(exporter: SpanExporter) -> Any:
    """One span per ``/v1`` request, from its start to the end of its answer (streams included). Sits inside the
    request context middleware, which binds the trace, request id and route; authentication (inside this one, in
    the same task) binds the tenant and workflow."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not scope["path"].startswith(TRACED_PREFIX):
                await app(scope, receive, send)
                return
            start_ns = time.time_ns()
            status = [0]

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                _record(exporter, start_ns, status[0] or 500, str(scope["method"]), str(scope["path"]))

        return middleware

    return factory


def _record(exporter: SpanExporter, start_ns: int, status: int, method: str, path: str) -> None:
    bound = context()
    trace_id, span_id = bound.get("trace_id"), bound.get("span_id")
    if not trace_id or not span_id or not int(bound.get("trace_flags", "01"), 16) & 1:
        return
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "http.route": path,
        "http.response.status_code": status,
    }
    for key, name in (
        ("request_id", "appliance.request_id"),
        ("tenant", "appliance.tenant"),
        ("workflow", "appliance.workflow"),
    ):
        if bound.get(key):
            attributes[name] = bound[key]
    exporter.record(
        Span(
            trace_id,
            span_id,
            bound.get("parent_span_id"),
            f"{method} {path}",
            start_ns,
            time.time_ns(),
            status,
            attributes,
        )
    )

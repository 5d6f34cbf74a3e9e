"""W3C trace context: a request's ``traceparent`` is accepted (or started when absent or malformed, as the
specification asks); the gateway's handling of the request is one span of its own (a span id made per request,
exported when OpenTelemetry export is on: :mod:`appliance.telemetry.otlp`) and each call it makes to an engine
carries that span as the parent, so a site's tracing (vLLM's OpenTelemetry included) links the engine's work to
the gateway's span and the client's trace."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from appliance.lib.ids import unique_hex
from appliance.lib.logging import bind, context

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    parent_id: str | None
    flags: str

    def child(self) -> str:
        """The traceparent of a call this request makes (a new span under this trace)."""
        return f"00-{self.trace_id}-{_span_id()}-{self.flags}"


def _span_id() -> str:
    """A random, non-zero span id (W3C Trace Context asks for randomness, not secrecy: no system call per call)."""
    return f"{random.getrandbits(64) or 1:016x}"


def parse_traceparent(value: str | None) -> TraceContext:
    """The caller's trace, or a new one (sampled) when the header is absent or not a valid version-00 value."""
    match = _TRACEPARENT.match((value or "").strip().lower())
    if match is None or match[1] == "0" * 32 or match[2] == "0" * 16:
        return TraceContext(unique_hex(), None, "01")
    return TraceContext(match[1], match[2], match[3])


def outgoing_traceparent() -> str | None:
    """The ``traceparent`` for a call made while handling the current request: the gateway's span as its parent
    (None outside a request)."""
    bound = context()
    trace_id = bound.get("trace_id")
    if trace_id is None:
        return None
    return f"00-{trace_id}-{bound.get('span_id') or _span_id()}-{bound.get('trace_flags', '01')}"


def bind_trace(value: str | None) -> TraceContext:
    """The request's trace, bound with the gateway's own span id for it and the caller's span as its parent."""
    trace = parse_traceparent(value)
    bind(trace_id=trace.trace_id, trace_flags=trace.flags, span_id=_span_id(), parent_span_id=trace.parent_id)
    return trace

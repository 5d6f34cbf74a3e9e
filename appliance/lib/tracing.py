"""W3C trace context: a request's ``traceparent`` is accepted (or started when absent or malformed, as the
specification asks) and each call the gateway makes to an engine carries it with the gateway's own span id,
so a site's tracing (vLLM's OpenTelemetry included) links the engine's work to the client's trace."""

from __future__ import annotations

import random
import re
import secrets
from dataclasses import dataclass

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
        return TraceContext(secrets.token_hex(16), None, "01")
    return TraceContext(match[1], match[2], match[3])


def outgoing_traceparent() -> str | None:
    """The ``traceparent`` for a call made while handling the current request (None outside one)."""
    trace_id = context().get("trace_id")
    if trace_id is None:
        return None
    return TraceContext(trace_id, None, context().get("trace_flags", "01")).child()


def bind_trace(value: str | None) -> TraceContext:
    trace = parse_traceparent(value)
    bind(trace_id=trace.trace_id, trace_flags=trace.flags)
    return trace

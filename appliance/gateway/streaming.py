"""Relaying one streamed answer from the engine to the client, and recording it exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from enum import Enum

import msgspec

from appliance.gateway.responses import ResponsesStreamUsage
from appliance.gateway.settlement import Settlement
from appliance.gateway.usage import StreamUsage, split_events, sse
from appliance.ledger.writer import UsageEvent
from appliance.lib.errors import ApplianceError, UpstreamError
from appliance.lib.httpclient import Answer, AnswerBroken, HTTPClientError
from appliance.settings import EngineRoute

log = logging.getLogger(__name__)


class _Outcome(Enum):
    CLIENT_GONE = "client_gone"  # until the engine's stream has been relayed to its end
    FINISHED = "finished"
    ENGINE_FAILED = "engine_failed"


class StreamRelay:
    """Async-iterable of SSE bytes for the client.

    :meth:`close` is synchronous and idempotent: it closes the engine connection (vLLM aborts a request
    whose connection is gone) and settles the request (usage row, budget, audit record). It runs when the relay ends for
    any reason: the end of the stream, an engine failure, the client going away while a chunk was being
    awaited (cancellation) or sent (:meth:`aclose`, called after the response), or before the first chunk.
    """

    def __init__(
        self,
        route: EngineRoute,
        response: Answer,
        usage: StreamUsage | ResponsesStreamUsage,
        settlement: Settlement,
        event: UsageEvent,
        stall_s: float | None = None,
    ) -> None:
        """``stall_s``: a client that takes none of the stream for this long is treated as gone (see
        :meth:`_watch`)."""
        self._route = route
        self._response = response
        self._usage = usage
        self._settlement = settlement
        self._event = event
        self._outcome = _Outcome.CLIENT_GONE
        self._events: AsyncGenerator[bytes, None] | None = None
        self._closed = False
        self._stall_s = stall_s
        self._handed_at: float | None = None  # when the chunk the client has not taken yet was handed over
        self._watchdog: asyncio.TimerHandle | None = None
        self.headers: dict[str, str] = {}
        self.prelude: list[bytes] = []  # SSE events sent before the engine's (retrieval's citations)

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._events is None:
            self._events = self._relay()
        return self._events

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._response.release()
        self._settlement.abandon(self._final_event())  # a no-op when the answer was settled already

    def _final_event(self) -> UsageEvent:
        usage, event = self._usage, self._event
        event.prompt_tokens = usage.prompt_tokens
        event.completion_tokens = usage.completion_tokens
        event.total_tokens = usage.total_tokens
        event.ttft_ms = usage.ttft_ms
        event.finish_reason = usage.finish_reason
        event.latency_ms = (time.perf_counter() - usage.started_at) * 1000.0
        if self._outcome is _Outcome.ENGINE_FAILED:
            event.status_code, event.error_code = 502, "engine_error"
        elif usage.error is not None:
            event.status_code, event.error_code = 500, "engine_stream_error"
        else:
            event.status_code = 200
            event.client_disconnected = self._outcome is _Outcome.CLIENT_GONE
        return event

    def _watch(self) -> None:
        """A client that has not taken a chunk for ``stall_s`` has stalled: the engine's connection is closed
        (vLLM aborts the request) and the request settled as one whose client left, charged what the engine
        generated so far; the stream ends when the client next reads, or with its connection. Until then
        nothing more is read from the engine (back-pressure), so nothing piles up here."""
        self._watchdog = None
        if self._closed:
            return
        handed_at = self._handed_at
        assert self._stall_s is not None
        if handed_at is not None and time.monotonic() - handed_at >= self._stall_s:
            log.warning("the client took none of the stream for %.0fs: cut from %s", self._stall_s, self._route.url)
            self.close()
            return
        due = self._stall_s - (time.monotonic() - handed_at) if handed_at is not None else self._stall_s
        self._watchdog = asyncio.get_running_loop().call_later(due, self._watch)

    async def _relay(self) -> AsyncGenerator[bytes, None]:
        buffer = bytearray()
        try:
            for event in self.prelude:
                yield event
            if self._stall_s is not None:
                self._watchdog = asyncio.get_running_loop().call_later(self._stall_s, self._watch)
            while chunk := await self._response.next_chunk():
                buffer += chunk
                for payload in split_events(buffer):
                    waiting_for_first = self._usage.first_token_at is None
                    out = self._usage.rewrite(payload)
                    if waiting_for_first and self._usage.first_token_at is not None:
                        self._settlement.first_token()
                    if out is None:
                        continue
                    if self._usage.done:
                        # The answer is complete: settled (audit record durable) before the client sees the end.
                        self._outcome = _Outcome.FINISHED
                        try:
                            await self._settlement.close(self._final_event())
                        except ApplianceError as exc:  # its records are not durable in time: no end, an error
                            yield sse(msgspec.json.encode(exc.envelope()))
                            return
                    self._handed_at = time.monotonic()
                    yield self._usage.frame(out)
                    self._handed_at = None
                    if self._closed:
                        return  # cut while the client stalled (settled already)
            if not self._usage.done:
                raise AnswerBroken("the stream ended without [DONE]")
        except (TimeoutError, HTTPClientError) as exc:
            self._outcome = _Outcome.ENGINE_FAILED
            log.warning("stream from %s broke off: %s", self._route.url, exc)
            error = UpstreamError(f"The engine serving `{self._route.model}` broke off the stream.")
            yield sse(msgspec.json.encode(error.envelope()))
        finally:
            self.close()  # synchronous: it must run even while the request is being cancelled

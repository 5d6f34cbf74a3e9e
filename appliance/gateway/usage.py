"""Usage capture on a streamed answer.

The gateway always asks the engine for ``include_usage`` and ``continuous_usage_stats``, so it knows the
tokens generated so far at every chunk (exact usage even when the client disconnects mid-stream). The
client receives only what it asked for: no usage at all, usage in a final chunk, or usage on every chunk.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

UPSTREAM_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
DONE = b"[DONE]"


class StreamUsage:
    """Rewrites one SSE stream's ``data:`` payloads for the client and remembers the usage seen."""

    __slots__ = (
        "answer",
        "client_continuous",
        "client_include",
        "completion_tokens",
        "done",
        "error",
        "first_token_at",
        "prompt_tokens",
        "started_at",
    )

    def __init__(
        self, *, client_include: bool, client_continuous: bool, started_at: float, answer: list[str] | None = None
    ) -> None:
        self.answer = answer  # when content is captured: the generated text is collected here
        self.client_include = client_include
        self.client_continuous = client_continuous and client_include
        self.started_at = started_at
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.done = False
        self.error: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started_at) * 1000.0

    def rewrite(self, payload: bytes) -> bytes | None:
        """One event's data -> what the client gets (``None``: nothing)."""
        if payload == DONE:
            self.done = True
            return payload
        try:
            chunk: Any = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return payload
        if not isinstance(chunk, dict):
            return payload
        if "error" in chunk:
            error = chunk["error"]
            self.error = str(error.get("message") if isinstance(error, dict) else error)[:500]
            return payload
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._observe(usage)
        if self.answer is not None:
            self.answer.extend(choice_texts(chunk))
        if not chunk.get("choices") and usage is not None:
            # The usage-only chunk that closes the stream.
            return payload if self.client_include else None
        if self.client_continuous:
            return payload
        if self.client_include:
            chunk["usage"] = None
        else:
            chunk.pop("usage", None)
        return msgspec.json.encode(chunk)

    def _observe(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        if completion > 0 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.completion_tokens = completion


def choice_texts(body: dict[str, Any]) -> list[str]:
    """The generated text of each choice of a chunk or of a whole answer (chat or completion)."""
    texts = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        part = choice.get("delta") or choice.get("message") or {}
        text = part.get("content") if isinstance(part, dict) else None
        text = text if isinstance(text, str) else choice.get("text")
        if isinstance(text, str):
            texts.append(text)
    return texts


def prompt_text(data: dict[str, Any]) -> str:
    """The input of a request as text (for content capture)."""
    if isinstance(data.get("messages"), list):
        lines = []
        for message in data["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            lines.append(f"{message.get('role', '?') if isinstance(message, dict) else '?'}: {content or ''}")
        return "\n".join(lines)
    value = data.get("prompt", data.get("input", ""))
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def split_events(buffer: bytearray) -> list[bytes]:
    """Take every complete SSE event's ``data`` payload out of ``buffer`` (the rest stays)."""
    payloads: list[bytes] = []
    while True:
        end = buffer.find(b"\n\n")
        if end < 0:
            return payloads
        event = bytes(buffer[:end])
        del buffer[: end + 2]
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            payloads.append(b"\n".join(data))


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"

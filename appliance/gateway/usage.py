"""Usage capture on a streamed answer.

The gateway always asks the engine for ``include_usage`` and ``continuous_usage_stats``, so it knows the
tokens generated so far at every chunk (exact usage even when the client disconnects mid-stream). The
client receives only what it asked for: no usage at all, usage in a final chunk, or usage on every chunk.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from appliance.gateway.protocol import finish_reason

UPSTREAM_STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
DONE = b"[DONE]"


class StreamFigures:
    """What one relayed stream has shown so far, as the settlement reads it: its tokens, its time to first token,
    whether it ended (``done``) or why it broke off (``error``), and, when content is captured, its text."""

    __slots__ = ("answer", "done", "error", "first_token_at", "started_at")

    def __init__(self, started_at: float, answer: list[str] | None) -> None:
        self.started_at = started_at
        self.answer = answer  # when content is captured: the generated text is collected here
        self.first_token_at: float | None = None
        self.done = False
        self.error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        raise NotImplementedError

    @property
    def completion_tokens(self) -> int:
        raise NotImplementedError

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.started_at) * 1000.0


class StreamUsage(StreamFigures):
    """Rewrites one SSE stream's ``data:`` payloads for the client and remembers the usage seen.

    With ``continuous_usage_stats`` vLLM puts on each chunk the usage of that chunk's choice alone (its prompt's
    tokens, that choice's tokens so far), so the usage of a stream cut off before its final usage chunk is the
    sum over every choice seen: an ``n > 1`` answer or a list of prompts is charged across all its choices."""

    __slots__ = (
        "_choices_per_prompt",
        "_completion",
        "_counted_prompt",
        "_final",
        "_finished",
        "_prompt",
        "client_continuous",
        "client_include",
    )

    def __init__(
        self,
        *,
        client_include: bool,
        client_continuous: bool,
        started_at: float,
        answer: list[str] | None = None,
        choices_per_prompt: int = 1,
        counted_prompt: int | None = None,
    ) -> None:
        super().__init__(started_at, answer)
        self.client_include = client_include
        self.client_continuous = client_continuous and client_include
        self._choices_per_prompt = max(1, choices_per_prompt)
        self._counted_prompt = counted_prompt  # the gateway's count of every prompt, when it made one
        self._completion: dict[int, int] = {}  # choice index -> its tokens so far
        self._prompt: dict[int, int] = {}  # prompt index -> its tokens
        self._final: tuple[int, int] | None = None  # the engine's totals, from the chunk that closes the stream
        self._finished: list[object] = []  # each choice's finish reason, as the chunks give them

    @property
    def finish_reason(self) -> str | None:
        return finish_reason(self._finished)

    @property
    def prompt_tokens(self) -> int:
        if self._final is not None:
            return self._final[0]
        # Cut off: the engine had every prompt; those not seen yet were being prefilled.
        return max(sum(self._prompt.values()), self._counted_prompt or 0)

    @property
    def completion_tokens(self) -> int:
        return self._final[1] if self._final is not None else sum(self._completion.values())

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
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self._finished.append(choice["finish_reason"])
        if isinstance(usage, dict):
            self._observe(usage, choices)
        if self.answer is not None:
            self.answer.extend(choice_texts(chunk))
        if not choices and usage is not None:
            # The usage-only chunk that closes the stream.
            return payload if self.client_include else None
        if self.client_continuous:
            return payload
        if self.client_include:
            chunk["usage"] = None
        else:
            chunk.pop("usage", None)
        return msgspec.json.encode(chunk)

    @staticmethod
    def frame(payload: bytes) -> bytes:
        return sse(payload)

    def _observe(self, usage: dict[str, Any], choices: Any) -> None:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        if not choices:
            self._final = (prompt, completion)
            return
        for choice in choices if isinstance(choices, list) else []:
            index = choice.get("index", 0) if isinstance(choice, dict) else 0
            index = index if isinstance(index, int) else 0
            self._completion[index] = max(self._completion.get(index, 0), completion)
            self._prompt[index // self._choices_per_prompt] = prompt
        if completion > 0 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()


def choice_texts(body: dict[str, Any]) -> list[str]:
    """The generated text of each choice of a chunk or of a whole answer (chat or completion), tool calls
    included (a streamed call comes as its name, then pieces of its arguments)."""
    texts = []
    for choice in body.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        part = choice.get("delta") or choice.get("message") or {}
        text = part.get("content") if isinstance(part, dict) else None
        text = text if isinstance(text, str) else choice.get("text")
        if isinstance(text, str):
            texts.append(text)
        if isinstance(part, dict):
            texts.extend(tool_call_texts(part.get("tool_calls")))
    return texts


def tool_call_texts(calls: Any) -> list[str]:
    """``[tool call] NAME ARGUMENTS`` for each call of a message (or each piece of a streamed one)."""
    texts = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        if isinstance(function.get("name"), str):
            texts.append(f"\n[tool call] {function['name']} ")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            texts.append(arguments)
        elif arguments is not None:
            texts.append(msgspec.json.encode(arguments).decode())
    return texts


def prompt_text(data: dict[str, Any]) -> str:
    """The input of a request as text (for content capture): the messages with their tool calls, and the tools
    offered (the engine renders them into the prompt)."""
    if isinstance(data.get("messages"), list):
        lines = []
        for message in data["messages"]:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            calls = "".join(tool_call_texts(message.get("tool_calls"))) if isinstance(message, dict) else ""
            lines.append(f"{message.get('role', '?') if isinstance(message, dict) else '?'}: {content or ''}{calls}")
        if data.get("tools"):
            lines.append(f"tools: {msgspec.json.encode(data['tools']).decode()}")
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

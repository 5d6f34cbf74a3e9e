"""The Responses API (``/v1/responses``) over vLLM's own: its parse stage, its prompt as the chat template sees it
(to count it before generation), its answers' usage and text, and which tenant owns each stored response.

vLLM renders a Responses request into chat messages and applies the model's chat template; the gateway counts the
same view through the engine's ``/tokenize`` (instructions as the system message, input items as messages,
function calls and their outputs as tool calls and tool messages, function tools as chat tools). A request that
continues an earlier response (``previous_response_id``) also carries that response's whole context, which the
engine reports as the earlier response's ``input_tokens + output_tokens``: it is added to the count.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from appliance.gateway.protocol import ResponsesRequest, validate
from appliance.gateway.shape import RequestShape, vet
from appliance.gateway.usage import StreamFigures
from appliance.lib.errors import InvalidRequestError
from appliance.lib.ids import unique_hex

RESPONSE_ID_PREFIX = "resp_"
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text")
_FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


def new_response_id() -> str:
    """The id the engine gives the response (the gateway names it, so it knows the owner before the engine
    answers)."""
    return f"{RESPONSE_ID_PREFIX}{unique_hex()}"


def parse_responses(data: dict[str, Any]) -> RequestShape:
    body = vet(data, "responses")
    request = validate(data, ResponsesRequest)
    if request.input is None or request.input == [] or request.input == "":
        raise InvalidRequestError("Missing required field `input`.", param="input", code="missing_field")
    for index, tool in enumerate(request.tools or []):
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"`tools[{index}]` is a `{tool.get('type')}` tool; only `function` tools are served (the appliance "
                "runs no built-in tools: no web or file search, no code interpreter, no remote MCP).",
                param=f"tools[{index}].type",
                code="unsupported_field",
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidRequestError("A function tool needs a `name`.", param=f"tools[{index}].name")
    return RequestShape(
        kind="responses",
        body=body,
        prompts=[],
        sequences=1,
        asked_cap=request.max_output_tokens,
        streamed=bool(request.stream),
        chat_view=chat_view(request),
    )


def chat_view(request: ResponsesRequest) -> dict[str, Any]:
    """The request's input as chat messages and chat tools: what the engine's chat template renders."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        for item in request.input or []:
            messages.append(_message(item))
    view: dict[str, Any] = {"messages": messages}
    tools = [_chat_tool(tool) for tool in request.tools or []]
    if tools:
        view["tools"] = tools
    return view


def _message(item: dict[str, Any]) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind == "message" or (kind is None and "role" in item):
        role = item.get("role", "user")
        return {"role": "system" if role == "developer" else role, "content": _text(item.get("content"))}
    if kind == "function_call":
        call = {"name": item.get("name", ""), "arguments": item.get("arguments", "")}
        tool_call = {"id": item.get("call_id", "call"), "type": "function", "function": call}
        return {"role": "assistant", "content": "", "tool_calls": [tool_call]}
    if kind == "function_call_output":
        output = item.get("output")
        content = output if isinstance(output, str) else msgspec.json.encode(output).decode()
        return {"role": "tool", "tool_call_id": item.get("call_id", "call"), "content": content}
    if kind == "reasoning":
        return {"role": "assistant", "content": _text(item.get("content")) + _text(item.get("summary"))}
    # Anything else counts as its JSON: an upper bound rather than a prompt counted short.
    return {"role": "user", "content": msgspec.json.encode(item).decode()}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append(part["text"])
    return "\n".join(parts)


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A flat Responses function tool as a chat tool, exactly as vLLM converts it (every key but ``type``, so
    ``strict`` too: the template renders what it is given)."""
    return {"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}}


def input_text(data: dict[str, Any]) -> str:
    """The request's input as text, for content capture."""
    lines = []
    for message in (parse_view(data) or {}).get("messages", []):
        calls = "".join(
            f"\n[tool call] {call['function']['name']} {call['function']['arguments']}"
            for call in message.get("tool_calls", [])
        )
        lines.append(f"{message['role']}: {message.get('content') or ''}{calls}")
    if data.get("tools"):
        lines.append(f"tools: {msgspec.json.encode(data['tools']).decode()}")
    return "\n".join(lines)


def parse_view(data: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return chat_view(msgspec.convert(data, ResponsesRequest))
    except msgspec.ValidationError:
        return None


def output_texts(response: Any) -> list[str]:
    """The generated text of a response object: its messages' text and its function calls."""
    texts: list[str] = []
    output = response.get("output") if isinstance(response, dict) else None
    for item in output if isinstance(output, list) else []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            texts.append(_text(item.get("content")))
        elif item.get("type") == "function_call":
            texts.append(f"\n[tool call] {item.get('name')} {item.get('arguments')}")
    return texts


def usage_of(response: Any) -> tuple[int, int]:
    """(input tokens, output tokens) of a response object (0, 0 when it carries none)."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


def finish_of(response: Any) -> str | None:
    """Why a response ended, as the ledger names it (`length` when it hit its output cap)."""
    if not isinstance(response, dict):
        return None
    details = response.get("incomplete_details")
    if isinstance(details, dict) and details.get("reason") == "max_output_tokens":
        return "length"
    status = response.get("status")
    return "stop" if status == "completed" else (str(status)[:32] if status else None)


class ResponsesStreamUsage(StreamFigures):
    """The usage of one streamed response, read from its events as they are relayed (the interface of
    :class:`appliance.gateway.usage.StreamUsage`). The engine reports usage only in the final event
    (``response.completed``); a stream cut off before it is charged its counted prompt and its whole reserved
    output (an upper bound: the engine's count is lost with the connection)."""

    __slots__ = (
        "_cap",
        "_counted_prompt",
        "_final",
        "_finish",
    )

    def __init__(
        self, *, started_at: float, counted_prompt: int | None, cap: int, answer: list[str] | None = None
    ) -> None:
        super().__init__(started_at, answer)
        self._counted_prompt = counted_prompt or 0
        self._cap = cap
        self._final: tuple[int, int] | None = None
        self._finish: str | None = None

    @property
    def finish_reason(self) -> str | None:
        return self._finish

    @property
    def prompt_tokens(self) -> int:
        return self._final[0] if self._final is not None else self._counted_prompt

    @property
    def completion_tokens(self) -> int:
        if self._final is not None:
            return self._final[1]
        return self._cap if self.first_token_at is not None else 0  # cut off while prefilling: nothing made

    def rewrite(self, payload: bytes) -> bytes | None:
        try:
            event: Any = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return payload
        if not isinstance(event, dict):
            return payload
        kind = event.get("type")
        if kind == "error" or ("error" in event and kind is None):
            error = event.get("error", event)
            self.error = str(error.get("message") if isinstance(error, dict) else error)[:500]
        elif isinstance(kind, str) and kind.endswith(".delta") and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if kind in _FINAL_EVENTS:
            response = event.get("response")
            self._final = usage_of(response)
            self._finish = finish_of(response)
            if kind == "response.failed":
                self.error = "the engine reported the response as failed"
            if self.answer is not None:
                self.answer.extend(output_texts(response))
            self.done = True
        return payload

    def frame(self, payload: bytes) -> bytes:
        """One SSE event as the engine sent it: its type as the event name, then its data."""
        try:
            kind = msgspec.json.decode(payload).get("type")
        except (msgspec.DecodeError, AttributeError):
            kind = None
        head = f"event: {kind}\n".encode() if isinstance(kind, str) and kind.isprintable() else b""
        return head + b"data: " + payload + b"\n\n"

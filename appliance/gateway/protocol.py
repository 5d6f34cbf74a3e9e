"""Wire protocol of the OpenAI-compatible endpoints: the fields the gateway checks and relies on.

Requests are validated against these structs; :mod:`appliance.gateway.shape` then decides which of the client's
fields the engine gets (the endpoint's OpenAI fields and an allowlist of vLLM extras) and what it may generate.
An explicit ``null`` is accepted wherever a field is optional, as the official SDK may send one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from appliance.lib.errors import InvalidRequestError
from appliance.lib.jsonbody import decode_bounded

PositiveInt = Annotated[int, Meta(ge=1)]


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False
    include_obfuscation: bool | None = None  # sent by the SDK; the gateway's SSE carries no obfuscation


class ChatMessage(Struct):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class FunctionDefinition(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments
    strict: bool | None = None


class Tool(Struct):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=256)]


class NamedToolChoice(Struct):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JSONSchemaFormat(Struct):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct):
    """``json_object`` and ``json_schema`` constrain the output through the engine's structured outputs."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaFormat | None = None


MAX_SEQUENCES = 128  # n (times the prompts of a completions list) at most


class _Generation(Struct):
    model: Annotated[str, Meta(min_length=1)]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_SEQUENCES)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    max_tokens: PositiveInt | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    add_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None

    @property
    def choices(self) -> int:
        return self.n or 1


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] = msgspec.field(default_factory=list)
    max_completion_tokens: PositiveInt | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


PromptInput = str | list[Any]  # text, token ids, or a list of either (checked item by item when parsed)


class CompletionRequest(_Generation):
    prompt: PromptInput | None = None
    best_of: PositiveInt | None = None


class EmbeddingRequest(Struct):
    model: Annotated[str, Meta(min_length=1)]
    input: PromptInput | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None
    add_special_tokens: bool | None = None


class _Finished(Struct):
    finish_reason: str | None = None


class UsageOnly(Struct):
    """Reads just ``usage`` and why each choice ended out of an engine's answer; msgspec skips the rest."""

    usage: dict[str, Any] | None = None
    choices: list[_Finished] | None = None

    @property
    def finish_reason(self) -> str | None:
        return finish_reason(choice.finish_reason for choice in self.choices or [])


def finish_reason(reasons: Iterable[object]) -> str | None:
    """A request's one reason: `length` if any choice was cut off by its cap, else the first reason given."""
    given = [reason for reason in reasons if isinstance(reason, str) and reason]
    if "length" in given:
        return "length"
    return given[0][:32] if given else None


RequestT = TypeVar("RequestT", bound=Struct)

_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def decode_json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequestError("The request body is empty; a JSON object is expected.", code="invalid_json")
    try:
        data = decode_bounded(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    return data


def validate(data: dict[str, Any], schema: type[RequestT]) -> RequestT:
    """Convert ``data`` into ``schema``; on failure name the offending field path in ``param``."""
    if "model" not in data:
        raise InvalidRequestError("Missing required field `model`.", param="model", code="missing_field")
    try:
        return msgspec.convert(data, schema)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        param = _param_from_path(match.group("path")) if match else None
        missing = re.match(r"Object missing required field `(?P<field>[^`]+)`", message)
        if missing:
            field = missing.group("field")
            param = f"{param}.{field}" if param else field
            raise InvalidRequestError(f"Missing required field `{param}`.", param=param, code="missing_field") from None
        unknown = re.match(r"Object contains unknown field `(?P<field>[^`]+)`", message)
        if unknown:
            field = unknown.group("field")
            param = f"{param}.{field}" if param else field
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: `{param}`.", param=param, code="unsupported_field"
            ) from None
        text = message[: match.start()] if match else message
        where = f" at `{param}`" if param else ""
        raise InvalidRequestError(f"Invalid value{where}: {text}", param=param, code="invalid_value") from None


def _param_from_path(path: str) -> str | None:
    """msgspec's ``$.messages[0].role`` -> ``messages[0].role``."""
    path = path.lstrip(".")
    return path or None


def require_inputs(request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest) -> None:
    """Checks the struct types cannot express (a non-empty field that has a default)."""
    if isinstance(request, ChatCompletionRequest) and not request.messages:
        raise InvalidRequestError("Missing required field `messages`.", param="messages", code="missing_field")
    if isinstance(request, CompletionRequest) and (request.prompt is None or request.prompt == []):
        raise InvalidRequestError("Missing required field `prompt`.", param="prompt", code="missing_field")
    if isinstance(request, EmbeddingRequest) and (request.input is None or request.input == []):
        raise InvalidRequestError("Missing required field `input`.", param="input", code="missing_field")
    if isinstance(request, ChatCompletionRequest):
        _require_tool_choice(request)
    if not isinstance(request, EmbeddingRequest):
        response_format = request.response_format
        if response_format is not None and response_format.type == "json_schema" and not response_format.json_schema:
            raise InvalidRequestError(
                "`response_format.json_schema` is required when its type is `json_schema`.",
                param="response_format.json_schema",
                code="missing_field",
            )
    if not isinstance(request, EmbeddingRequest) and request.stream_options is not None and not request.stream:
        raise InvalidRequestError("`stream_options` is only allowed when `stream` is true.", param="stream_options")


def _require_tool_choice(request: ChatCompletionRequest) -> None:
    """A tool choice other than ``none`` needs tools, and a named one a tool of that name."""
    choice = request.tool_choice
    if choice is None or choice == "none":
        return
    names = [tool.function.name for tool in request.tools or []]
    if not names:
        raise InvalidRequestError("`tool_choice` needs `tools` to choose from.", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(
            f"`tool_choice` names `{choice.function.name}`, which is not one of the `tools`.",
            param="tool_choice.function.name",
        )


class ResponsesRequest(Struct):
    """``POST /v1/responses``: the fields the gateway counts and checks; the engine validates the items and tools
    in depth (its 400 is passed on)."""

    model: Annotated[str, Meta(min_length=1)]
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: PositiveInt | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    truncation: Literal["auto", "disabled"] | None = None


ScoreTexts = str | Annotated[list[str], Meta(min_length=1)]


class ScoreRequest(Struct):
    """``POST /v1/score`` (vLLM's): each text of ``queries`` against each of ``documents`` (or ``text_1`` against
    ``text_2``); texts only."""

    model: Annotated[str, Meta(min_length=1)]
    queries: ScoreTexts | None = None
    documents: ScoreTexts | None = None
    text_1: ScoreTexts | None = None
    text_2: ScoreTexts | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None


class RerankRequest(Struct):
    """``POST /v1/rerank`` (vLLM's, Jina/Cohere-shaped): ``documents`` ordered by relevance to ``query``."""

    model: Annotated[str, Meta(min_length=1)]
    query: Annotated[str, Meta(min_length=1)]
    documents: ScoreTexts
    top_n: Annotated[int, Meta(ge=0)] | None = None
    truncate_prompt_tokens: Annotated[int, Meta(ge=-1)] | None = None


class TokenizeRequest(Struct, forbid_unknown_fields=True):
    """``POST /v1/tokenize`` (vLLM's ``/tokenize``): a text (``prompt``) or a chat (``messages``, rendered with the
    model's chat template) into the model's token ids."""

    model: Annotated[str, Meta(min_length=1)]
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(Struct, forbid_unknown_fields=True):
    """``POST /v1/detokenize`` (vLLM's ``/detokenize``): token ids back into text."""

    model: Annotated[str, Meta(min_length=1)]
    tokens: Annotated[list[Annotated[int, Meta(ge=0, le=2**31 - 1)]], Meta(min_length=1)]

"""Every field of the official `openai` SDK's request types is either served or refused with its reason: a field
a new SDK adds shows up here as a failing test, not as a user's "Unrecognized request argument" 400."""

from typing import Any

import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.responses import response_create_params

from appliance.gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponsesRequest
from appliance.gateway.shape import Kind, field_verdict, parse
from appliance.lib.errors import InvalidRequestError

SDK_TYPES: dict[Kind, tuple[Any, ...]] = {
    "chat": (chat_create_params.CompletionCreateParamsStreaming, chat_create_params.CompletionCreateParamsNonStreaming),
    "completions": (
        completion_create_params.CompletionCreateParamsStreaming,
        completion_create_params.CompletionCreateParamsNonStreaming,
    ),
    "embeddings": (embedding_create_params.EmbeddingCreateParams,),
    "responses": (
        response_create_params.ResponseCreateParamsStreaming,
        response_create_params.ResponseCreateParamsNonStreaming,
    ),
}
SCHEMAS = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "responses": ResponsesRequest,
}
BASE: dict[Kind, dict[str, Any]] = {
    "chat": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "m", "prompt": "hi"},
    "embeddings": {"model": "m", "input": "hi"},
    "responses": {"model": "m", "input": "hi"},
}


def sdk_fields(kind: Kind) -> set[str]:
    return {name for request_type in SDK_TYPES[kind] for name in request_type.__annotations__}


@pytest.mark.parametrize("kind", ["chat", "completions", "embeddings", "responses"])
def test_every_sdk_field_is_served_or_refused_with_a_reason(kind: Kind) -> None:
    fields = sdk_fields(kind)
    assert {"model", "stream" if kind != "embeddings" else "input"} <= fields, "the SDK's types were read"
    unknown = sorted(name for name in fields if field_verdict(kind, name) in ("unknown", "other_endpoint"))
    assert unknown == [], f"the openai SDK sends fields the gateway does not know: {unknown}"


@pytest.mark.parametrize("kind", ["chat", "completions", "embeddings", "responses"])
def test_an_explicit_null_for_every_sdk_field_equals_absent(kind: Kind) -> None:
    """Agent frameworks send `null` for fields they leave unset: each is accepted as absent, refused fields too
    (a null asks for nothing), and none reaches the engine."""
    for name in sorted(sdk_fields(kind) - set(BASE[kind])):
        shape = parse({**BASE[kind], name: None}, SCHEMAS[kind])
        assert name not in shape.body, name


def test_a_refused_field_with_a_value_is_refused_with_its_reason() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse({**BASE["chat"], "moderation": {"model": "omni-moderation-latest"}}, ChatCompletionRequest)
    assert refused.value.param == "moderation" and "runs no moderation model" in refused.value.message


def test_an_unknown_field_is_still_refused() -> None:
    with pytest.raises(InvalidRequestError, match="Unrecognized request argument"):
        parse({**BASE["chat"], "temprature": 0.2}, ChatCompletionRequest)

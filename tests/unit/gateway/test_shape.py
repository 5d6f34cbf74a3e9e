"""The parse stage: what the engine gets of a request, how many sequences it may produce, the one cap it obeys.
Shapes come from what the official openai SDK's request types can carry."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from appliance.gateway.shape import PromptTokens, output_cap, parse
from appliance.lib.errors import InvalidRequestError

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, **fields}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **fields}


def test_chat_cap_is_max_completion_tokens_over_max_tokens_and_only_it_is_forwarded() -> None:
    shape = parse(chat(max_tokens=1, max_completion_tokens=300, min_tokens=500), ChatCompletionRequest)
    assert shape.asked_cap == 300  # what vLLM obeys when both are sent
    shape.set_cap(40)
    assert shape.body["max_completion_tokens"] == 40 and "max_tokens" not in shape.body
    assert shape.body["min_tokens"] == 40, "min_tokens cannot ask for more than the cap"


def test_chat_with_only_max_tokens_uses_it() -> None:
    assert parse(chat(max_tokens=7), ChatCompletionRequest).asked_cap == 7
    assert parse(chat(), ChatCompletionRequest).asked_cap is None


def test_every_choice_is_a_sequence() -> None:
    assert parse(chat(n=8), ChatCompletionRequest).sequences == 8
    assert parse(chat(n=None, stream=None), ChatCompletionRequest).sequences == 1  # the SDK may send null


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("one", ["one"]),
        (["a", "b", "c"], ["a", "b", "c"]),
        ([1, 2, 3], [[1, 2, 3]]),  # one prompt of token ids
        ([[1, 2], [3]], [[1, 2], [3]]),  # two prompts of token ids
        (["a", [5, 6]], ["a", [5, 6]]),
    ],
)
def test_completions_prompts_are_every_item_and_sequences_multiply(prompt: Any, prompts: list[Any]) -> None:
    shape = parse(completion(prompt=prompt, n=3), CompletionRequest)
    assert shape.prompts == prompts
    assert shape.sequences == 3 * len(prompts)


@pytest.mark.parametrize("prompt", [[], [[]], [1.5], ["a", 3], [True], [-1], [{"text": "x"}]])
def test_malformed_prompt_lists_are_refused(prompt: Any) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(completion(prompt=prompt), CompletionRequest)
    assert info.value.param is not None and info.value.param.startswith("prompt")


def test_too_many_sequences_are_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(completion(prompt=["x"] * 16, n=9), CompletionRequest)
    assert info.value.param == "n"


def test_best_of_other_than_n_is_refused_and_never_forwarded() -> None:
    assert "best_of" not in parse(completion(best_of=1), CompletionRequest).body
    with pytest.raises(InvalidRequestError) as info:
        parse(completion(best_of=5, n=1), CompletionRequest)
    assert info.value.param == "best_of"


@pytest.mark.parametrize(
    ("data", "schema", "param"),
    [
        (completion(messages=MESSAGES), CompletionRequest, "messages"),  # counted as nothing, or refused
        (chat(prompt="x" * 1000), ChatCompletionRequest, "prompt"),
        (chat(input="x"), ChatCompletionRequest, "input"),
        ({"model": "m", "input": "x", "messages": MESSAGES}, EmbeddingRequest, "messages"),
        (chat(cache_salt="mine"), ChatCompletionRequest, "cache_salt"),
        (chat(priority=-100), ChatCompletionRequest, "priority"),
        (chat(use_beam_search=True), ChatCompletionRequest, "use_beam_search"),
        (completion(prompt_logprobs=5), CompletionRequest, "prompt_logprobs"),
        (completion(suffix="tail"), CompletionRequest, "suffix"),
        (chat(chat_template="{{ 'x' * 100000 }}"), ChatCompletionRequest, "chat_template"),
        (chat(request_id="someone-elses"), ChatCompletionRequest, "request_id"),
        (chat(kv_transfer_params={}), ChatCompletionRequest, "kv_transfer_params"),
        (chat(vllm_xargs={"a": 1}), ChatCompletionRequest, "vllm_xargs"),
        (chat(functions=[{"name": "f"}]), ChatCompletionRequest, "functions"),
        (chat(made_up_field=1), ChatCompletionRequest, "made_up_field"),
        ({"model": "m", "input": "x", "padding": "max_length"}, EmbeddingRequest, "padding"),
        ({"model": "m", "input": "x", "max_tokens": 5}, EmbeddingRequest, "max_tokens"),
    ],
)
def test_fields_that_do_not_belong_or_change_cost_unchecked_are_refused(
    data: dict[str, Any], schema: type, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(data, schema)
    assert info.value.param == param and info.value.status_code == 400
    assert f"`{param}`" in info.value.message


def test_openai_fields_the_engine_ignores_are_accepted_but_not_forwarded() -> None:
    shape = parse(chat(user="u1", metadata={"a": "b"}, store=False, service_tier="auto"), ChatCompletionRequest)
    assert not {"user", "metadata", "store", "service_tier"} & set(shape.body)


def test_vetted_extras_and_sdk_fields_pass_through() -> None:
    data = chat(
        top_k=5,
        ignore_eos=True,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto",
        response_format={"type": "json_object"},
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
    )
    shape = parse(data, ChatCompletionRequest)
    assert shape.body["top_k"] == 5 and shape.body["ignore_eos"] is True and shape.body["tools"]
    assert "stream_options" not in shape.body  # the gateway asks the engine for its own usage options
    assert shape.streamed and shape.include_usage


def test_embeddings_generate_nothing_and_count_every_input() -> None:
    shape = parse({"model": "m", "input": ["a", "b", [1, 2]]}, EmbeddingRequest)
    assert shape.sequences == 0 and not shape.generates and shape.prompts == ["a", "b", [1, 2]]


def test_default_cap_never_exceeds_the_context_left() -> None:
    shape = parse(chat(), ChatCompletionRequest)
    assert output_cap(shape, PromptTokens(100, 100), 8192, 1024) == 1024
    assert output_cap(shape, PromptTokens(8000, 8000), 8192, 1024) == 192
    assert output_cap(shape, PromptTokens(100, 100), None, 1024) == 1024  # context not known yet


def test_a_cap_past_the_context_or_a_prompt_filling_it_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as info:
        output_cap(parse(chat(max_completion_tokens=9000), ChatCompletionRequest), PromptTokens(10, 10), 8192, 1024)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "max_completion_tokens")
    with pytest.raises(InvalidRequestError) as info:
        output_cap(parse(completion(), CompletionRequest), PromptTokens(300, 300), 256, 16)
    assert info.value.param == "prompt"


def test_choices_per_prompt_say_which_prompt_a_choice_answers() -> None:
    assert parse(chat(n=3), ChatCompletionRequest).choices_per_prompt == 3
    assert parse(completion(prompt=["a", "b"], n=2), CompletionRequest).choices_per_prompt == 2


WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


@pytest.mark.parametrize(
    "choice", ["auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_tools_and_each_tool_choice_pass_to_the_engine_as_sent(choice: Any) -> None:
    shape = parse(chat(tools=[WEATHER], tool_choice=choice, parallel_tool_calls=False), ChatCompletionRequest)
    assert shape.body["tools"] == [WEATHER] and shape.body["tool_choice"] == choice
    assert shape.body["parallel_tool_calls"] is False


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True}},
        {"type": "text"},
    ],
)
def test_response_formats_pass_to_the_engine(response_format: dict[str, Any]) -> None:
    assert parse(chat(response_format=response_format), ChatCompletionRequest).body["response_format"] == (
        response_format
    )
    assert parse(completion(response_format=response_format), CompletionRequest).body["response_format"] == (
        response_format
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ],
)
def test_tool_and_format_mistakes_are_refused_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(chat(**fields), ChatCompletionRequest)
    assert info.value.param == param

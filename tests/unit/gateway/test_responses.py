"""The Responses API's parse stage, its chat view (what the gateway counts), its stream's usage, and who owns a
stored response."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from appliance.db.engine import create_schema, make_engine
from appliance.gateway.models import StoredResponse
from appliance.gateway.owners import ResponseNotFoundError, ResponseOwners
from appliance.gateway.protocol import ResponsesRequest
from appliance.gateway.responses import ResponsesStreamUsage, finish_of, input_text, output_texts, usage_of
from appliance.gateway.shape import PromptTokens, output_cap, parse
from appliance.lib.errors import InvalidRequestError
from appliance.lib.principal import Principal

BASE = {"model": "m", "input": "hi"}


def shape_of(**fields: Any) -> Any:
    return parse({**BASE, **fields}, ResponsesRequest)


def test_the_input_items_and_tools_are_counted_as_the_chat_template_renders_them() -> None:
    shape = shape_of(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use metric units."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
        ],
        tools=[{"type": "function", "name": "weather", "parameters": {"type": "object"}, "strict": True}],
    )
    assert shape.chat_view == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "system", "content": "Use metric units."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        ],
        "tools": [
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}, "strict": True}}
        ],
    }
    assert shape.generates and shape.sequences == 1 and shape.prompts == []


def test_max_output_tokens_is_the_one_cap_forwarded_and_the_context_bounds_it() -> None:
    shape = shape_of(max_output_tokens=50)
    assert shape.asked_cap == 50
    shape.set_cap(20)
    assert shape.body["max_output_tokens"] == 20 and "max_tokens" not in shape.body
    with pytest.raises(InvalidRequestError) as too_many:
        output_cap(shape_of(max_output_tokens=900), PromptTokens(200, 200), 1024, 64)
    assert too_many.value.param == "max_output_tokens" and too_many.value.code == "context_length_exceeded"
    assert output_cap(shape_of(), PromptTokens(1000, 1000), 1024, 64) == 24, "the default, within the context"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": []}, "input"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ({"cache_salt": "mine"}, "cache_salt"),
        ({"request_id": "resp_chosen"}, "request_id"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_what_the_gateway_cannot_account_for_or_isolate_is_refused_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        shape_of(**fields)
    assert refused.value.param == param


def test_sdk_only_options_are_accepted_and_not_forwarded() -> None:
    shape = shape_of(stream=True, stream_options={"include_obfuscation": False}, metadata={"a": "b"}, store=True)
    assert shape.streamed and "stream_options" not in shape.body and "metadata" not in shape.body
    assert shape.body["store"] is True


def test_a_responses_answer_gives_its_usage_text_and_finish() -> None:
    answer = {
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {"type": "reasoning", "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "Paris."}]},
            {"type": "function_call", "name": "f", "arguments": "{}"},
        ],
        "usage": {"input_tokens": 12, "output_tokens": 4, "total_tokens": 16},
    }
    assert usage_of(answer) == (12, 4)
    assert finish_of(answer) == "length"
    assert finish_of({"status": "completed"}) == "stop"
    assert output_texts(answer) == ["Paris.", "\n[tool call] f {}"]
    assert input_text({**BASE, "instructions": "Be brief.", "tools": [{"type": "function", "name": "f"}]}) == (
        'system: Be brief.\nuser: hi\ntools: [{"type":"function","name":"f"}]'
    )


def _event(kind: str, **fields: Any) -> bytes:
    return msgspec.json.encode({"type": kind, **fields})


def test_a_streamed_response_settles_the_final_usage_and_a_cut_one_its_reservation() -> None:
    finished = ResponsesStreamUsage(started_at=0.0, counted_prompt=30, cap=64, answer=[])
    finished.rewrite(_event("response.created", response={"id": "resp_1"}))
    assert finished.completion_tokens == 0 and not finished.done, "nothing generated yet"
    finished.rewrite(_event("response.output_text.delta", delta="Par"))
    assert finished.ttft_ms is not None
    completed = {"status": "completed", "output": [], "usage": {"input_tokens": 31, "output_tokens": 7}}
    finished.rewrite(_event("response.completed", response=completed))
    assert finished.done and (finished.prompt_tokens, finished.completion_tokens) == (31, 7)
    assert finished.finish_reason == "stop" and finished.error is None

    cut = ResponsesStreamUsage(started_at=0.0, counted_prompt=30, cap=64)
    cut.rewrite(_event("response.output_text.delta", delta="Par"))
    assert not cut.done and (cut.prompt_tokens, cut.completion_tokens) == (30, 64), "an upper bound"
    framed = cut.frame(_event("response.output_text.delta", delta="is"))
    assert framed.startswith(b"event: response.output_text.delta\ndata: {") and framed.endswith(b"\n\n")


async def test_a_stored_response_is_found_for_its_own_tenant_only(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'owners.db'}")
    create_schema(engine)
    owners = ResponseOwners(engine)
    await owners.record(
        StoredResponse(
            response_id="resp_a",
            tenant_id="t1",
            api_key_id="k1",
            subject="k1",
            model="m",
            engine_url="http://127.0.0.1:1",
            request_id="req_1",
        )
    )
    mine = Principal(kind="api_key", subject="k2", tenant_id="t1", api_key_id="k2")
    assert (await owners.find("resp_a", mine)).engine_url == "http://127.0.0.1:1", "another key of the same tenant"
    for principal in (
        Principal(kind="api_key", subject="k3", tenant_id="t2", api_key_id="k3"),
        Principal(kind="token", subject="admin", roles=frozenset({"admin"})),
    ):
        with pytest.raises(ResponseNotFoundError) as hidden:
            await owners.find("resp_a", principal, "previous_response_id")
        assert hidden.value.status_code == 404 and hidden.value.param == "previous_response_id"
    with pytest.raises(ResponseNotFoundError) as unknown:
        await owners.find("resp_b", mine)
    assert unknown.value.message == "No response with id `resp_b` was found."
    engine.dispose()

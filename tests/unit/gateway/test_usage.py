import json

import pytest

from appliance.gateway.usage import StreamUsage, choice_texts, prompt_text, split_events, sse


def chunk(content: str | None, usage: dict[str, int] | None, *, choices: bool = True) -> bytes:
    body: dict[str, object] = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    body["choices"] = [{"index": 0, "delta": {"content": content}}] if choices else []
    body["usage"] = usage
    return json.dumps(body).encode()


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stream(capture: StreamUsage) -> list[dict[str, object] | str]:
    upstream = [
        chunk("", usage(7, 0)),
        chunk("Hel", usage(7, 1)),
        chunk("lo", usage(7, 2)),
        chunk(None, usage(7, 2), choices=False),
        b"[DONE]",
    ]
    out: list[dict[str, object] | str] = []
    for payload in upstream:
        rewritten = capture.rewrite(payload)
        if rewritten is not None:
            out.append("[DONE]" if rewritten == b"[DONE]" else json.loads(rewritten))
    return out


def test_client_that_did_not_ask_for_usage_gets_none() -> None:
    capture = StreamUsage(client_include=False, client_continuous=False, started_at=0.0)
    out = stream(capture)
    assert out[-1] == "[DONE]"
    chunks = [c for c in out if isinstance(c, dict)]
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)
    assert (capture.prompt_tokens, capture.completion_tokens, capture.done) == (7, 2, True)


def test_include_usage_gives_null_usage_then_a_final_usage_chunk() -> None:
    capture = StreamUsage(client_include=True, client_continuous=False, started_at=0.0)
    chunks = [c for c in stream(capture) if isinstance(c, dict)]
    assert [c["usage"] for c in chunks[:-1]] == [None, None, None]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == usage(7, 2)


def test_continuous_usage_is_passed_on_every_chunk() -> None:
    capture = StreamUsage(client_include=True, client_continuous=True, started_at=0.0)
    chunks = [c for c in stream(capture) if isinstance(c, dict)]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 2]  # type: ignore[index]


def test_time_to_first_token_is_taken_at_the_first_generated_token() -> None:
    capture = StreamUsage(client_include=False, client_continuous=False, started_at=0.0)
    capture.rewrite(chunk("", usage(7, 0)))
    assert capture.ttft_ms is None
    capture.rewrite(chunk("a", usage(7, 1)))
    assert capture.ttft_ms is not None and capture.ttft_ms > 0


def test_error_event_is_passed_on_and_remembered() -> None:
    capture = StreamUsage(client_include=False, client_continuous=False, started_at=0.0)
    payload = b'{"error": {"message": "boom", "type": "x"}}'
    assert capture.rewrite(payload) == payload
    assert capture.error == "boom"


@pytest.mark.parametrize("cut", [1, 5, 17, 30])
def test_split_events_handles_arbitrary_chunk_boundaries(cut: int) -> None:
    wire = sse(b'{"a": 1}') + b": keep-alive comment\n\n" + sse(b"[DONE]")
    buffer = bytearray()
    payloads: list[bytes] = []
    for start in range(0, len(wire), cut):
        buffer += wire[start : start + cut]
        payloads += split_events(buffer)
    assert payloads == [b'{"a": 1}', b"[DONE]"]
    assert buffer == b""


def choice_chunk(index: int, prompt: int, completion: int) -> bytes:
    body = {"id": "c", "choices": [{"index": index, "delta": {"content": "x"}}], "usage": usage(prompt, completion)}
    return json.dumps(body).encode()


def test_a_stream_cut_off_is_charged_across_every_choice() -> None:
    """vLLM's continuous usage is per choice: n=3 cut off after a few tokens is the sum of the three."""
    capture = StreamUsage(
        client_include=False, client_continuous=False, started_at=0.0, choices_per_prompt=3, counted_prompt=7
    )
    for step in (1, 2, 3):
        for index in range(3):
            if index == 2 and step == 3:
                break
            capture.rewrite(choice_chunk(index, 7, step))
    assert (capture.prompt_tokens, capture.completion_tokens) == (7, 3 + 3 + 2)


def test_a_list_of_prompts_cut_off_is_charged_every_prompt_counted() -> None:
    """Choices of prompt i are i*n .. i*n+n-1; a prompt whose choices were not seen yet was being prefilled."""
    capture = StreamUsage(
        client_include=False, client_continuous=False, started_at=0.0, choices_per_prompt=2, counted_prompt=30
    )
    capture.rewrite(choice_chunk(0, 10, 1))
    capture.rewrite(choice_chunk(3, 8, 1))
    assert (capture.prompt_tokens, capture.completion_tokens) == (30, 2)
    capture.rewrite(json.dumps({"id": "c", "choices": [], "usage": usage(29, 40)}).encode())
    assert (capture.prompt_tokens, capture.completion_tokens) == (29, 40), "the engine's totals win when they come"


WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def test_captured_prompt_carries_the_tools_offered_and_the_calls_made() -> None:
    text = prompt_text(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
            "tools": [WEATHER_TOOL],
        }
    )
    assert text.splitlines() == [
        "user: Weather in Paris?",
        "assistant: ",
        '[tool call] get_weather {"city":"Paris"}',
        "tool: sunny",
        'tools: [{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":'
        '{"city":{"type":"string"}}}}}]',
    ]


def test_captured_answer_carries_tool_calls_whole_or_streamed() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    whole = choice_texts(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}}]}
    )
    pieces = [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
    ]
    streamed = [t for p in pieces for t in choice_texts({"choices": [{"index": 0, "delta": {"tool_calls": [p]}}]})]
    assert "".join(whole) == "".join(streamed) == '\n[tool call] get_weather {"city": "Paris"}'

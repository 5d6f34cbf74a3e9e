import pytest

from appliance.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    decode_json_object,
    require_inputs,
    validate,
)
from appliance.lib.errors import InvalidRequestError


def chat(**fields: object) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("body", [b"", b"   ", b"{bad", b"[1, 2]", b'"text"'])
def test_bodies_that_are_not_a_json_object_are_refused(body: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_json_object(body)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"messages": []}, "model"),
        (chat(max_tokens="ten"), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(temperature=3), "temperature"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        (chat(stream="yes"), "stream"),
        (chat(stream=True, stream_options={"include_usage": "no"}), "stream_options.include_usage"),
        (chat(stream=True, stream_options={"nonsense": True}), "stream_options.nonsense"),
    ],
)
def test_invalid_fields_name_their_path(data: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate(data, ChatCompletionRequest)
    assert info.value.param == param
    assert param in info.value.message or info.value.code == "missing_field"


@pytest.mark.parametrize(
    ("data", "schema", "param"),
    [
        ({"model": "m"}, ChatCompletionRequest, "messages"),
        ({"model": "m", "messages": []}, ChatCompletionRequest, "messages"),
        ({"model": "m"}, CompletionRequest, "prompt"),
        ({"model": "m", "input": []}, EmbeddingRequest, "input"),
        (chat(stream_options={"include_usage": True}), ChatCompletionRequest, "stream_options"),
    ],
)
def test_missing_inputs_are_refused(data: dict[str, object], schema: type, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        require_inputs(validate(data, schema))
    assert info.value.param == param


def test_unknown_sampling_fields_pass_validation() -> None:
    request = validate(chat(top_k=5, ignore_eos=True, seed=3), ChatCompletionRequest)
    require_inputs(request)
    assert request.model == "m"

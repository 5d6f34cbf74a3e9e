"""What ingestion and retrieval read of an embedding engine's answer: the vectors in input order and the tokens
counted; anything else is the engine's fault (UpstreamError, 502), never a 500 nor a half-written document."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from appliance.lib.errors import UpstreamError
from appliance.retrieval.embeddings import embeddings_of, embeddings_request


def test_vectors_come_in_input_order_as_floats_with_the_tokens_counted() -> None:
    body = json.dumps(
        {
            "object": "list",
            "model": "minilm-l6-v2",
            "data": [
                {"object": "embedding", "index": 1, "embedding": [0.5, -1, 2e-3]},
                {"object": "embedding", "index": 0, "embedding": [1, 0, 0.25]},
            ],
            "usage": {"prompt_tokens": 7, "total_tokens": 7},
        }
    ).encode()
    vectors, tokens = embeddings_of(body, 2)
    assert vectors == [[1.0, 0.0, 0.25], [0.5, -1.0, 0.002]]
    assert all(isinstance(x, float) for vector in vectors for x in vector), "integers in JSON become floats"
    assert tokens == 7


@pytest.mark.parametrize("usage", [None, {}, {"prompt_tokens": None}])
def test_an_answer_without_a_token_count_counts_none(usage: object) -> None:
    answer: dict[str, object] = {"data": [{"index": 0, "embedding": [1.0]}]}
    if usage is not None:
        answer["usage"] = usage
    assert embeddings_of(json.dumps(answer).encode(), 1) == ([[1.0]], 0)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>bad gateway</html>", "not embeddings"),
        (b'{"data": [{"index": 0, "embedding": "AAAAAAA="}]}', "not embeddings"),  # 5 bytes: not float32s
        (b'{"data": [{"index": 0, "embedding": "not base64!"}]}', "not embeddings"),
        (b'{"data": [{"index": 0, "embedding": "AADAfw=="}]}', "not embeddings"),  # a float32 NaN
        (b'{"data": [{"index": 0, "embedding": "AACAfw=="}]}', "not embeddings"),  # infinity
        (b'{"data": [{"index": 0, "embedding": [1.0, "x"]}]}', "not embeddings"),
        (b'{"data": [{"embedding": [1.0]}]}', "not embeddings"),
        (b'{"error": {"message": "overloaded"}}', "not embeddings"),
        (b'{"data": [{"index": 0, "embedding": [1.0]}]}', "1 embeddings for 2 texts"),
    ],
)
def test_anything_else_is_the_engines_fault(body: bytes, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        embeddings_of(body, 2)


def test_vectors_are_asked_for_as_base64_float32_and_read_as_the_engine_computed_them() -> None:
    assert json.loads(embeddings_request("minilm-l6-v2", ["a", "b"])) == {
        "model": "minilm-l6-v2",
        "input": ["a", "b"],
        "encoding_format": "base64",
        "endianness": "little",
    }
    first, second = [0.1, -0.5, 3.25e-7], [1.0, 0.0, -1.0]

    def packed(vector: list[float]) -> str:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    body = json.dumps(
        {"data": [{"index": 1, "embedding": packed(second)}, {"index": 0, "embedding": packed(first)}]}
    ).encode()
    vectors, _ = embeddings_of(body, 2)
    assert vectors == [list(struct.unpack("<3f", struct.pack("<3f", *first))), second], "float32, in input order"
    assert vectors[0] == pytest.approx(first, rel=1e-6)

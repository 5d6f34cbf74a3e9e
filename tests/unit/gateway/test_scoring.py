"""Score and rerank requests: every text the engine will encode is a prompt to count; nothing is generated."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.gateway.protocol import RerankRequest, ScoreRequest
from appliance.gateway.shape import parse
from appliance.lib.errors import InvalidRequestError


def test_every_query_and_document_is_a_counted_prompt_and_nothing_is_generated() -> None:
    score = parse({"model": "m", "queries": "cats", "documents": ["a cat", "a dog"]}, ScoreRequest)
    assert score.prompts == ["cats", "a cat", "a dog"] and score.sequences == 0 and not score.generates
    pairs = parse({"model": "m", "text_1": ["a", "b"], "text_2": ["c", "d"], "user": "u"}, ScoreRequest)
    assert pairs.prompts == ["a", "b", "c", "d"] and "user" not in pairs.body
    rerank = parse({"model": "m", "query": "cats", "documents": ["a cat", "a dog"], "top_n": 1}, RerankRequest)
    assert rerank.prompts == ["cats", "a cat", "a dog"] and rerank.body["top_n"] == 1


@pytest.mark.parametrize(
    ("schema", "data", "param"),
    [
        (ScoreRequest, {"documents": ["a"]}, "queries"),
        (ScoreRequest, {"queries": "a"}, "documents"),
        (ScoreRequest, {"queries": ["a", "b"], "documents": ["c", "d", "e"]}, "queries"),
        (ScoreRequest, {"queries": "a", "documents": "b", "text_1": "c"}, "text_1"),
        (ScoreRequest, {"data_1": "a", "data_2": "b"}, "data_1"),
        (ScoreRequest, {"queries": [{"type": "image_url"}], "documents": "b"}, "queries[0]"),
        (RerankRequest, {"documents": ["a"]}, "query"),
        (RerankRequest, {"query": "q", "documents": []}, "documents"),
        (RerankRequest, {"query": "q", "documents": ["a"], "instruction": "be kind"}, "instruction"),
        (RerankRequest, {"query": "q", "documents": ["a"], "cache_salt": "x"}, "cache_salt"),
    ],
)
def test_malformed_or_unserved_score_requests_are_refused_naming_the_field(
    schema: Any, data: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse({"model": "m", **data}, schema)
    assert refused.value.param == param

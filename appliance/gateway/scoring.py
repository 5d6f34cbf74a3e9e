"""Score and rerank (vLLM's ``/score`` and ``/rerank``) on a pooling model: the parse stage.

vLLM 0.32 serves both for an embedding model (a bi-encoder: each text is embedded and pairs are scored by cosine
similarity) as well as for a cross-encoder. Every text the engine will encode is a prompt the budgets count (the
engine embeds each query and each document); nothing is generated. Usage settles from the engine's ``usage``.
"""

from __future__ import annotations

from typing import Any

from appliance.gateway.protocol import RerankRequest, ScoreRequest, validate
from appliance.gateway.shape import Prompt, RequestShape, vet
from appliance.lib.errors import InvalidRequestError


def _texts(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _missing(name: str) -> InvalidRequestError:
    return InvalidRequestError(f"Missing required field `{name}`.", param=name, code="missing_field")


def parse_score(data: dict[str, Any]) -> RequestShape:
    body = vet(data, "score")
    request = validate(data, ScoreRequest)
    uses_queries = request.queries is not None or request.documents is not None
    if uses_queries and (request.text_1 is not None or request.text_2 is not None):
        raise InvalidRequestError("Send `queries` and `documents`, or `text_1` and `text_2`, not both.", param="text_1")
    first, second = ("queries", "documents") if uses_queries else ("text_1", "text_2")
    left = _texts(request.queries if uses_queries else request.text_1)
    right = _texts(request.documents if uses_queries else request.text_2)
    if not left:
        raise _missing(first)
    if not right:
        raise _missing(second)
    if len(left) > 1 and len(left) != len(right):
        raise InvalidRequestError(
            f"`{first}` has {len(left)} texts and `{second}` {len(right)}: one, or as many as `{second}`.",
            param=first,
        )
    return _shape("score", body, [*left, *right])


def parse_rerank(data: dict[str, Any]) -> RequestShape:
    body = vet(data, "rerank")
    request = validate(data, RerankRequest)
    documents = _texts(request.documents)
    if not documents:
        raise _missing("documents")
    return _shape("rerank", body, [request.query, *documents])


def _shape(kind: Any, body: dict[str, Any], texts: list[str]) -> RequestShape:
    prompts: list[Prompt] = list(texts)
    return RequestShape(kind=kind, body=body, prompts=prompts, sequences=0, asked_cap=None, streamed=False)

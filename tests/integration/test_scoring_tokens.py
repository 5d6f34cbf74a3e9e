"""Score, rerank, tokenize and detokenize against the real engines through the gateway (the openai SDK has no
methods for them: its generic `client.post`, as application code would call them)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI, PermissionDeniedError, RateLimitError

from tests.integration.conftest import CHAT_MODEL, EMBED_MODEL, Appliance
from tests.integration.test_responses import admin_post, audit_events, tenant_key

pytestmark = pytest.mark.integration

DOCUMENTS = ["The capital of France is Paris.", "Bananas are yellow.", "Paris is a city in France."]


def post(client: OpenAI, path: str, body: dict[str, Any]) -> httpx.Response:
    response: httpx.Response = client.post(path, body=body, cast_to=httpx.Response)
    return response


def test_rerank_and_score_on_the_embedding_model_settle_the_engine_usage(appliance: Appliance, client: OpenAI) -> None:
    reranked = post(client, "/rerank", {"model": EMBED_MODEL, "query": "Where is Paris?", "documents": DOCUMENTS})
    body = reranked.json()
    order = [result["index"] for result in body["results"]]
    assert order[-1] == 1, "the banana is the least relevant"
    row = appliance.usage_row(reranked.headers["x-request-id"])
    assert (row["endpoint"], row["prompt_tokens"], row["completion_tokens"]) == (
        "/v1/rerank",
        body["usage"]["prompt_tokens"],
        0,
    )
    scored = post(client, "/score", {"model": EMBED_MODEL, "queries": "Where is Paris?", "documents": DOCUMENTS})
    scores = [item["score"] for item in scored.json()["data"]]
    assert len(scores) == 3 and scores[1] < min(scores[0], scores[2])
    assert [e["event_type"] for e in audit_events(appliance, scored.headers["x-request-id"])] == ["inference.score"]
    with pytest.raises(BadRequestError) as generative:
        post(client, "/rerank", {"model": CHAT_MODEL, "query": "q", "documents": DOCUMENTS})
    assert generative.value.response.json()["error"]["code"] == "model_not_supported"


async def test_a_score_over_budget_is_refused_before_the_engine(appliance: Appliance) -> None:
    created = tenant_key(appliance, f"budgeted-score-{uuid.uuid4().hex[:6]}")
    budget = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "period": "day"}
    await admin_post(appliance, "/admin/budgets/", {**budget, "limit": 20})
    client = OpenAI(base_url=appliance.gateway_url + "/v1", api_key=created["key"], max_retries=0)
    with pytest.raises(RateLimitError) as refused:
        post(client, "/score", {"model": EMBED_MODEL, "queries": "Where is Paris?", "documents": DOCUMENTS * 3})
    assert refused.value.response.json()["error"]["type"] == "budget_exceeded"
    row = appliance.usage_row(refused.value.response.headers["x-request-id"])
    assert (row["status_code"], row["prompt_tokens"]) == (429, 0)


async def test_tokenize_and_detokenize_round_trip_with_the_engine_tokenizer(
    appliance: Appliance, client: OpenAI
) -> None:
    tokens = post(client, "/tokenize", {"model": CHAT_MODEL, "prompt": "Hello, world!"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = post(client, "/detokenize", {"model": CHAT_MODEL, "tokens": tokens["tokens"]})
    assert text.json()["prompt"].endswith("Hello, world!")
    chat = post(client, "/tokenize", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2, "the chat template's tokens too"
    row = appliance.usage_row(text.headers["x-request-id"])
    assert (row["endpoint"], row["status_code"], row["total_tokens"]) == ("/v1/detokenize", 200, 0)
    with pytest.raises(BadRequestError) as refused:
        post(client, "/tokenize", {"model": CHAT_MODEL, "prompt": "x", "chat_template": "{{ bad }}"})
    assert refused.value.response.json()["error"]["param"] == "chat_template"
    created = tenant_key(appliance, f"embed-only-tok-{uuid.uuid4().hex[:6]}")
    limited = await admin_post(
        appliance, "/admin/api-keys/", {"workflow_id": created["workflow_id"], "allowed_models": [EMBED_MODEL]}
    )
    other = OpenAI(base_url=appliance.gateway_url + "/v1", api_key=limited["key"], max_retries=0)
    with pytest.raises(PermissionDeniedError):
        post(other, "/tokenize", {"model": CHAT_MODEL, "prompt": "x"})

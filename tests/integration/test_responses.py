"""The Responses API with the official openai SDK against the gateway and the real engine: created (sync, async,
streamed, the stream helper), stored, retrieved and continued within a tenant; budgets count its input through the
chat template and clamp `max_output_tokens`; another tenant's response ids are not found, whichever way they are
used; a model off the allowlist, background mode and built-in tools are refused."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI, PermissionDeniedError, RateLimitError
from openai.types.responses import FunctionToolParam

from tests.integration.conftest import CHAT_MODEL, EMBED_MODEL, Appliance

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France? Answer in one sentence."
INSTRUCTIONS = "You are a helpful assistant."


def tenant_key(appliance: Appliance, tenant: str) -> dict[str, Any]:
    result = appliance.cli("admin", "create-key", "--tenant", tenant, "--workflow", "wf", "--create")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def sdk(appliance: Appliance, key: str) -> OpenAI:
    return OpenAI(base_url=appliance.gateway_url + "/v1", api_key=key, max_retries=0, timeout=120)


async def admin_post(appliance: Appliance, path: str, body: dict[str, Any]) -> dict[str, Any]:
    admin = appliance.cli("admin", "token", "--role", "admin").stdout.strip()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session:
        async with session.post(appliance.gateway_url + path, json=body) as response:
            assert response.status == 201, await response.text()
            return dict(await response.json())


def audit_events(appliance: Appliance, request_id: str) -> list[dict[str, Any]]:
    return appliance.rows("SELECT * FROM audit_records WHERE request_id = ?", request_id)


def test_sync_create_settles_the_engine_usage_in_the_ledger_and_the_audit_log(
    appliance: Appliance, client: OpenAI
) -> None:
    raw = client.responses.with_raw_response.create(
        model=CHAT_MODEL, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=16, temperature=0
    )
    response = raw.parse()
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage is not None and response.usage.input_tokens > 0
    assert 0 < response.usage.output_tokens <= 16
    request_id = raw.headers["x-request-id"]
    row = appliance.usage_row(request_id)
    assert row["endpoint"] == "/v1/responses" and row["status_code"] == 200 and row["streamed"] == 0
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    assert raw.headers["x-request-cost"]
    assert [event["event_type"] for event in audit_events(appliance, request_id)] == ["inference.responses"]


def test_streamed_events_and_the_stream_helper_end_with_the_usage_the_ledger_records(
    appliance: Appliance, client: OpenAI
) -> None:
    raw = client.responses.with_raw_response.create(
        model=CHAT_MODEL, input=QUESTION, max_output_tokens=16, temperature=0, stream=True
    )
    stream = raw.parse()
    types, deltas, completed = [], [], None
    for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            completed = event.response
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert completed is not None and completed.usage is not None
    assert "".join(deltas) == completed.output_text
    row = appliance.usage_row(raw.headers["x-request-id"])
    assert (row["streamed"], row["prompt_tokens"], row["completion_tokens"]) == (
        1,
        completed.usage.input_tokens,
        completed.usage.output_tokens,
    )
    with client.responses.stream(model=CHAT_MODEL, input=QUESTION, max_output_tokens=16, temperature=0) as helper:
        text = "".join(event.delta for event in helper if event.type == "response.output_text.delta")
        final = helper.get_final_response()
    assert text == final.output_text == completed.output_text, "temperature 0: the same answer both ways"
    stored = client.responses.retrieve(final.id)
    assert stored.output_text == final.output_text


async def test_async_create_stream_retrieve_and_continue_within_the_tenant(appliance: Appliance) -> None:
    client = AsyncOpenAI(base_url=appliance.gateway_url + "/v1", api_key=appliance.api_key, max_retries=0, timeout=120)
    first = await client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=16, temperature=0)
    assert first.usage is not None
    again = await client.responses.retrieve(first.id)
    assert (again.id, again.output_text) == (first.id, first.output_text)
    follow = await client.responses.create(
        model=CHAT_MODEL,
        input="And of Italy?",
        previous_response_id=first.id,
        max_output_tokens=16,
        temperature=0,
    )
    assert follow.usage is not None and follow.previous_response_id == first.id
    # The engine prepends the earlier exchange: the new prompt holds it all.
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    stream = await client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=8, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.completed"
    unstored = await client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=4, store=False)
    with pytest.raises(NotFoundError):
        await client.responses.retrieve(unstored.id)
    await client.close()


async def test_another_tenants_response_id_is_not_found_however_it_is_used(
    appliance: Appliance, client: OpenAI
) -> None:
    mine = client.responses.create(model=CHAT_MODEL, input=QUESTION, max_output_tokens=8, temperature=0)
    other = sdk(appliance, tenant_key(appliance, f"intruder-{uuid.uuid4().hex[:6]}")["key"])
    with pytest.raises(NotFoundError) as retrieved:
        other.responses.retrieve(mine.id)
    assert retrieved.value.response.json()["error"]["code"] == "response_not_found"
    with pytest.raises(NotFoundError) as continued:
        other.responses.create(model=CHAT_MODEL, input="What did I ask?", previous_response_id=mine.id)
    assert continued.value.response.json()["error"]["param"] == "previous_response_id"
    with pytest.raises(NotFoundError):
        other.responses.cancel(mine.id)
    with pytest.raises(NotFoundError) as unknown:
        other.responses.retrieve("resp_" + uuid.uuid4().hex)
    assert unknown.value.response.json()["error"]["message"].startswith("No response with id")
    # The attempts are on the record, as denials.
    request_id = retrieved.value.response.headers["x-request-id"]
    row = appliance.usage_row(request_id)
    assert (row["endpoint"], row["status_code"]) == ("/v1/responses/{response_id}", 404)
    events = audit_events(appliance, request_id)
    assert [(e["event_type"], e["outcome"], e["object_id"]) for e in events] == [
        ("inference.responses.retrieve", "denied", mine.id)
    ]
    assert client.responses.retrieve(mine.id).id == mine.id, "its own tenant still reads it"


async def test_budgets_count_the_input_clamp_the_output_and_refuse_before_generation(appliance: Appliance) -> None:
    created = tenant_key(appliance, f"budgeted-responses-{uuid.uuid4().hex[:6]}")
    budget = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "period": "day"}
    await admin_post(appliance, "/admin/budgets/", {**budget, "limit": 300})
    client = sdk(appliance, created["key"])
    tools: list[FunctionToolParam] = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city.",
            "strict": False,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    ]
    raw = client.responses.with_raw_response.create(
        model=CHAT_MODEL, input="Tell me a long story about the sea.", instructions=INSTRUCTIONS, tools=tools
    )
    response = raw.parse()
    assert response.usage is not None
    clamp = int(raw.headers["x-budget-max-tokens"])
    assert clamp == 300 - response.usage.input_tokens, "instructions, input and tools counted as the engine counts"
    assert response.usage.output_tokens <= clamp
    with pytest.raises(RateLimitError) as refused:
        client.responses.create(model=CHAT_MODEL, input="Tell me a long story about the sea. " * 40)
    assert refused.value.response.json()["error"]["type"] == "budget_exceeded"
    row = appliance.usage_row(refused.value.response.headers["x-request-id"])
    assert (row["status_code"], row["completion_tokens"]) == (429, 0), "refused before the engine generated"


async def test_a_model_off_the_allowlist_and_unserved_features_are_refused(
    appliance: Appliance, client: OpenAI
) -> None:
    created = tenant_key(appliance, f"embed-only-{uuid.uuid4().hex[:6]}")
    limited = await admin_post(
        appliance, "/admin/api-keys/", {"workflow_id": created["workflow_id"], "allowed_models": [EMBED_MODEL]}
    )
    with pytest.raises(PermissionDeniedError) as denied:
        sdk(appliance, limited["key"]).responses.create(model=CHAT_MODEL, input=QUESTION)
    assert denied.value.response.json()["error"]["code"] == "model_not_allowed"
    with pytest.raises(BadRequestError) as background:
        client.responses.create(model=CHAT_MODEL, input=QUESTION, background=True)
    assert background.value.response.json()["error"]["param"] == "background"
    with pytest.raises(BadRequestError) as builtin:
        client.responses.create(model=CHAT_MODEL, input=QUESTION, tools=[{"type": "web_search"}])
    assert builtin.value.response.json()["error"]["param"] == "tools[0].type"
    with pytest.raises(BadRequestError) as pooling:
        client.responses.create(model=EMBED_MODEL, input=QUESTION)
    assert pooling.value.response.json()["error"]["code"] == "model_not_supported"


def captured(appliance: Appliance, request_id: str) -> tuple[str, str]:
    [row] = appliance.rows("SELECT prompt, answer FROM audit_content WHERE request_id = ?", request_id)
    return str(row["prompt"]), str(row["answer"])


@pytest.mark.parametrize("stream", [False, True])
def test_content_capture_keeps_the_input_and_the_output_text(appliance: Appliance, stream: bool) -> None:
    admin = {"Authorization": f"Bearer {appliance.cli('admin', 'token', '--role', 'admin').stdout.strip()}"}
    with httpx.Client(base_url=appliance.gateway_url, headers=admin, timeout=30) as http:
        tenant = http.post(
            "/admin/tenants", json={"name": f"captured-{uuid.uuid4().hex[:8]}", "content_capture": True}
        ).json()
        workflow = http.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "w"}).json()
        key = http.post("/admin/api-keys", json={"workflow_id": workflow["id"]}).json()["key"]
    raw = sdk(appliance, key).responses.with_raw_response.create(
        model=CHAT_MODEL, input=QUESTION, instructions=INSTRUCTIONS, max_output_tokens=12, temperature=0, stream=stream
    )
    if stream:
        text = next(e.response.output_text for e in raw.parse() if e.type == "response.completed")
    else:
        text = raw.parse().output_text
    prompt, answer = captured(appliance, raw.headers["x-request-id"])
    assert prompt == f"system: {INSTRUCTIONS}\nuser: {QUESTION}"
    assert answer == text and text

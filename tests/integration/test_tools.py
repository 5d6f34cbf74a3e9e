"""Tool calling and structured outputs through the gateway, against the real engine (SmolLM2 with the Hermes
parser its model.yaml declares), with the official SDK and LangChain's OpenAI client.

A 135M model rarely decides to call a tool by itself, so `tool_choice: auto` is checked for being served and
parsed, while `required` and named choices, which vLLM forces through structured outputs (the Hermes call
envelope, and the arguments' schema for a `strict` tool), must produce calls whose arguments validate against the
tool's schema; `json_schema` answers must validate against theirs."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel

from tests.integration.conftest import CHAT_MODEL, Appliance

pytestmark = pytest.mark.integration

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMETERS,
        "strict": True,  # the engine pins the arguments to the schema (without it, only the call's envelope)
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}
LIMIT = 900  # under the default cap (1024): the budget clamps, and says so in x-budget-max-tokens


@pytest.fixture(scope="module")
def tools_tenant(appliance: Appliance) -> dict[str, Any]:
    """A tenant with content capture on and a token budget on its workflow: what tools cost and what is kept."""
    admin = {"Authorization": f"Bearer {appliance.cli('admin', 'token', '--role', 'admin').stdout.strip()}"}
    with httpx.Client(base_url=appliance.gateway_url, headers=admin, timeout=30) as http:
        tenant = http.post(
            "/admin/tenants", json={"name": f"tools-{uuid.uuid4().hex[:8]}", "content_capture": True}
        ).json()
        workflow = http.post("/admin/workflows", json={"tenant_id": tenant["id"], "name": "agents"}).json()
        key = http.post("/admin/api-keys", json={"workflow_id": workflow["id"]}).json()["key"]
        budget = {"scope_type": "workflow", "scope_id": workflow["id"], "kind": "tokens", "period": "day"}
        assert http.post("/admin/budgets/", json={**budget, "limit": 10**7}).status_code == 201
    return {"key": key, "workflow_id": workflow["id"], "admin": admin}


@pytest.fixture(scope="module")
def tools_client(appliance: Appliance, tools_tenant: dict[str, Any]) -> OpenAI:
    return OpenAI(base_url=appliance.gateway_url + "/v1", api_key=tools_tenant["key"], max_retries=0, timeout=120)


def check_call(call: Any, tools: dict[str, dict[str, Any]]) -> dict[str, Any]:
    assert call.type == "function" and call.id
    assert call.function.name in tools
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tools[call.function.name])
    return dict(arguments)


def test_named_tool_choice_gives_a_call_that_validates(tools_client: OpenAI) -> None:
    completion = tools_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    )
    calls = completion.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    check_call(calls[0], {"get_weather": WEATHER_PARAMETERS})


def test_required_tool_choice_calls_one_of_the_tools(tools_client: OpenAI) -> None:
    completion = tools_client.chat.completions.create(
        model=CHAT_MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120, temperature=0
    )
    calls = completion.choices[0].message.tool_calls or []
    assert calls
    for call in calls:
        check_call(call, {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]})


def test_auto_tool_choice_is_served_and_parsed(tools_client: OpenAI) -> None:
    """Refused by an engine started without a tool parser; now the model answers or calls, and a call parses."""
    completion = tools_client.chat.completions.create(
        model=CHAT_MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=60, temperature=0
    )
    message = completion.choices[0].message
    assert message.tool_calls or message.content
    for call in message.tool_calls or []:
        assert call.function.name == "get_weather"
        json.loads(call.function.arguments)


def test_a_tool_result_goes_back_to_the_model(tools_client: OpenAI) -> None:
    """The second turn of an agent loop: the assistant's call (content null) and the tool's answer."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    completion = tools_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees celsius."},
        ],
        tools=[WEATHER],
        max_tokens=40,
        temperature=0,
    )
    assert completion.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_streamed_named_call_through_the_sdk_stream_helper(tools_client: OpenAI) -> None:
    with tools_client.chat.completions.stream(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather"]
    check_call(calls[0], {"get_weather": WEATHER_PARAMETERS})


def test_tool_schemas_are_counted_as_prompt_tokens_by_budgets(
    appliance: Appliance, tools_tenant: dict[str, Any]
) -> None:
    """The budget's clamp is what is left after the prompt the engine saw, tools rendered into it."""
    created = json.loads(
        appliance.cli(
            "admin", "create-key", "--tenant", f"tools-budget-{uuid.uuid4().hex[:8]}", "--workflow", "w", "--create"
        ).stdout
    )
    with httpx.Client(base_url=appliance.gateway_url, headers=tools_tenant["admin"], timeout=30) as http:
        budget = {"scope_type": "workflow", "scope_id": created["workflow_id"], "kind": "tokens", "period": "day"}
        assert http.post("/admin/budgets/", json={**budget, "limit": LIMIT}).status_code == 201
    client = OpenAI(base_url=appliance.gateway_url + "/v1", api_key=created["key"], max_retries=0, timeout=120)
    plain = client.chat.completions.create(model=CHAT_MODEL, messages=ASK, max_tokens=1, temperature=0)
    assert plain.usage is not None
    used = plain.usage.total_tokens
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
    )
    completion = raw.parse()
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > plain.usage.prompt_tokens + 100, "the tool schemas are in the prompt"
    assert int(raw.headers["x-budget-max-tokens"]) == LIMIT - used - completion.usage.prompt_tokens


def test_json_schema_output_validates_against_its_schema(tools_client: OpenAI) -> None:
    completion = tools_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
        },
        max_tokens=120,
        temperature=0,
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), CITY_SCHEMA)


def test_json_object_output_is_json(tools_client: OpenAI) -> None:
    completion = tools_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": 'Answer in JSON with a key "answer": what is the capital of France?'}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content or ""), dict)


class City(BaseModel):
    city: str
    country: str
    population_millions: int


async def test_async_sdk_parse_with_a_pydantic_model(appliance: Appliance, tools_tenant: dict[str, Any]) -> None:
    """The SDK turns the pydantic model into a strict json_schema and parses the answer back into it."""
    client = AsyncOpenAI(base_url=appliance.gateway_url + "/v1", api_key=tools_tenant["key"], max_retries=0)
    completion = await client.chat.completions.parse(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON: city, country, population in millions."}],
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)
    stream = client.chat.completions.stream(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON: city, country, population in millions."}],
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    async with stream as events:
        async for _event in events:
            pass
        streamed = (await events.get_final_completion()).choices[0].message.parsed
    assert streamed == parsed
    await client.close()


def test_langchain_openai_binds_a_tool(appliance: Appliance, tools_tenant: dict[str, Any]) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather in a city, in celsius or fahrenheit."""
        return f"Sunny in {city}"

    model = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=appliance.gateway_url + "/v1",
        api_key=tools_tenant["key"],  # type: ignore[arg-type]
        temperature=0,
        max_retries=0,
        max_completion_tokens=80,
    )
    message = model.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke(
        "What is the weather in Paris?"
    )
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    assert get_weather.invoke(message.tool_calls[0]["args"]).startswith("Sunny in")


@pytest.mark.parametrize("stream", [False, True])
def test_captured_content_keeps_the_tools_and_the_call(
    appliance: Appliance, tools_client: OpenAI, tools_tenant: dict[str, Any], stream: bool
) -> None:
    raw = tools_client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80,
        temperature=0,
        stream=stream,
    )
    request_id = raw.headers["x-request-id"]
    if stream:
        assert any(chunk.choices and chunk.choices[0].delta.tool_calls for chunk in raw.parse())
    [row] = appliance.rows("SELECT prompt, answer FROM audit_content WHERE request_id = ?", request_id)
    prompt, answer = row["prompt"], row["answer"]
    assert '"name":"get_weather"' in prompt and prompt.startswith("user: What is the weather in Paris")
    assert "[tool call] get_weather {" in answer
    check_call_text = answer[answer.index("[tool call] get_weather ") + len("[tool call] get_weather ") :]
    jsonschema.validate(json.loads(check_call_text), WEATHER_PARAMETERS)

"""Bad input through the real gateway: every error in the OpenAI envelope, with the right status."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from openai import OpenAI

from tests.integration.conftest import CHAT_MODEL, EMBED_MODEL, Appliance

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "hello"}]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert exc.response.headers["x-request-id"].startswith("req_")
    return dict(body["error"])


def test_unknown_model_is_404(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)  # type: ignore[arg-type]
    error = error_of(info.value)
    assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_missing_messages_names_the_field(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=[])
    error = error_of(info.value)
    assert error["param"] == "messages" and "length >= 1" in error["message"]


def test_invalid_field_names_its_path(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "wizard", "content": "x"}],  # type: ignore[list-item]
        )
    assert error_of(info.value)["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens="ten")  # type: ignore[arg-type]
    assert error_of(info.value)["param"] == "max_tokens"


def test_embedding_without_input_is_refused(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=EMBED_MODEL, input=[])
    assert error_of(info.value)["param"] == "input"


def test_request_the_engine_refuses_is_passed_on(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=HELLO, max_tokens=100_000)
    error = error_of(info.value)
    assert error["type"] == "invalid_request_error"
    assert "100000" in error["message"] or "max_tokens" in error["message"]


async def test_malformed_json_and_oversized_body(appliance: Appliance) -> None:
    async with aiohttp.ClientSession(headers=appliance.auth) as session:
        async with session.post(
            appliance.gateway_url + "/v1/chat/completions",
            data=b'{"model": "x",',
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["code"] == "invalid_json"
        big = (
            b'{"model": "'
            + CHAT_MODEL.encode()
            + b'", "messages": [{"role": "user", "content": "'
            + b"a" * (5 << 20)
            + b'"}]}'
        )
        async with session.post(
            appliance.gateway_url + "/v1/chat/completions", data=big, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "request_too_large"

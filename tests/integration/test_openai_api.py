"""The OpenAI-compatible API through the gateway, against the real vLLM CPU engines, with the official SDK."""

from __future__ import annotations

import base64
import struct

import aiohttp
import pytest
from openai import OpenAI

from tests.integration.conftest import CHAT_MODEL, EMBED_MODEL, Appliance

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_models_lists_the_served_models(client: OpenAI) -> None:
    assert {model.id for model in client.models.list().data} == {CHAT_MODEL, EMBED_MODEL}


def test_chat_completion_answers_and_records_usage(client: OpenAI, appliance: Appliance) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.usage is not None
    row = appliance.usage_row(raw.headers["x-request-id"])
    assert row["model"] == CHAT_MODEL and row["endpoint"] == "/v1/chat/completions"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
    )
    assert row["status_code"] == 200 and not row["streamed"] and not row["client_disconnected"]
    assert row["latency_ms"] > 0


async def test_usage_equals_the_engines_own_count(client: OpenAI, appliance: Appliance) -> None:
    engine = appliance.engine_url(CHAT_MODEL)
    async with aiohttp.ClientSession(headers=appliance.auth) as session:
        async with session.post(
            engine + "/tokenize", json={"model": CHAT_MODEL, "messages": QUESTION, "add_generation_prompt": True}
        ) as response:
            prompt_count = (await response.json())["count"]
        async with session.post(
            engine + "/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0, "ignore_eos": True},
        ) as response:
            direct = (await response.json())["usage"]
    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(raw.parse())
    final = chunks[-1].usage
    assert final is not None
    assert final.prompt_tokens == prompt_count == direct["prompt_tokens"]
    assert final.completion_tokens == direct["completion_tokens"] == 12
    row = appliance.usage_row(raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        prompt_count,
        12,
        prompt_count + 12,
    )
    assert row["streamed"] and row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["latency_ms"]


def test_streaming_chat_arrives_chunk_by_chunk_without_usage_unless_asked(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    # One chunk per token that adds text ("The capital of France is Paris." and what follows), not one answer:
    # the special tokens that ignore_eos lets through add none, and an engine with a tool-call parser sends no
    # chunk for them.
    assert len(chunks) >= 8
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk for a client that did not ask"
    assert "Paris" in "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


def test_streaming_with_include_usage_ends_with_a_usage_chunk(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_continuous_usage_stats_are_passed_on_when_asked(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=QUESTION,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        )
    )
    counts = [chunk.usage.completion_tokens for chunk in chunks if chunk.usage is not None]
    assert len(counts) == len(chunks) and counts == sorted(counts)


def test_completions_plain_and_streamed(client: OpenAI, appliance: Appliance) -> None:
    completion = client.completions.create(
        model=CHAT_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert "Paris" in completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens <= 6
    chunks = list(
        client.completions.create(
            model=CHAT_MODEL,
            prompt="The capital of France is",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_embeddings_float_and_base64(client: OpenAI, appliance: Appliance) -> None:
    raw = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=["a cat", "a dog"])
    response = raw.parse()  # the SDK asks for base64 and decodes it
    assert [len(item.embedding) for item in response.data] == [384, 384]
    as_float = client.embeddings.create(model=EMBED_MODEL, input="a cat", encoding_format="float")
    assert as_float.data[0].embedding == pytest.approx(response.data[0].embedding, abs=1e-5)
    row = appliance.usage_row(raw.headers["x-request-id"])
    assert row["endpoint"] == "/v1/embeddings" and row["prompt_tokens"] == response.usage.prompt_tokens > 0


async def test_embedding_vectors_come_back_as_packed_floats(appliance: Appliance) -> None:
    async with aiohttp.ClientSession(headers=appliance.auth) as session:
        async with session.post(
            appliance.gateway_url + "/v1/embeddings",
            json={"model": EMBED_MODEL, "input": "x", "encoding_format": "base64"},
        ) as response:
            body = await response.json()
    packed = base64.b64decode(body["data"][0]["embedding"])
    assert len(struct.unpack(f"<{len(packed) // 4}f", packed)) == 384

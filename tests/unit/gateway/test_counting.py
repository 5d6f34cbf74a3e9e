"""Prompt counting as the engine sees it: every prompt of a list, token ids by length, the local tokenizer used
only once it agrees with the engine (the fake engine counts one token per word)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from appliance.gateway.counting import TokenCounter
from appliance.gateway.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from appliance.gateway.shape import parse
from appliance.gateway.upstream import EngineRouter
from appliance.settings import EngineRoute, GatewaySettings
from tests.support import fake_engine as fake
from tests.support.fake_engine import FakeEngine


def tokenizer_folder(root: Path, pre_tokenizer: Any) -> Path:
    """A real ``tokenizer.json`` (word level, every word unknown: one token per word or piece)."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizer
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


@pytest.fixture
async def router(fake_engine: FakeEngine) -> AsyncIterator[tuple[EngineRouter, EngineRoute]]:
    route = EngineRoute(model="fake", url=fake_engine.url)
    router = EngineRouter(GatewaySettings(routes=[route]))
    await router.start()
    yield router, route
    await router.stop()


async def test_a_list_of_prompts_is_counted_locally_without_a_round_trip_per_item(router: Any, tmp_path: Path) -> None:
    engine_router, route = router
    counter = TokenCounter(
        engine_router, {"fake": tokenizer_folder(tmp_path / "fake", pre_tokenizers.WhitespaceSplit())}
    )
    prompts = [f"prompt number {i} has six words" for i in range(16)] + [[7, 8, 9]]
    before = len(fake.TOKENIZE_SERVED)
    counted = await counter.count(route, parse({"model": "fake", "prompt": prompts}, CompletionRequest), "r1")
    assert (counted.total, counted.longest) == (16 * 6 + 3, 6)
    probes = len(fake.TOKENIZE_SERVED) - before
    assert probes == 2, "only the one-time check of the tokenizer (with and without special tokens) asks the engine"
    await counter.count(route, parse({"model": "fake", "prompt": prompts}, CompletionRequest), "r2")
    assert len(fake.TOKENIZE_SERVED) - before == probes
    assert counter.context_length(route) == 8192  # the engine's max_model_len, learned from its answer


async def test_a_tokenizer_that_disagrees_with_the_engine_is_not_used(router: Any, tmp_path: Path) -> None:
    engine_router, route = router
    counter = TokenCounter(engine_router, {"fake": tokenizer_folder(tmp_path / "fake", pre_tokenizers.Whitespace())})
    inputs = ["a, b, c", "d e", "a, b, c"]
    before = len(fake.TOKENIZE_SERVED)
    counted = await counter.count(route, parse({"model": "fake", "input": inputs}, EmbeddingRequest), "r")
    assert counted.total == 3 + 2 + 3  # the engine's count, not the local one (which splits the commas off)
    asked = [body.get("prompt") for body in fake.TOKENIZE_SERVED[before:]]
    assert asked.count("a, b, c") == 1, "each distinct text is asked once"


async def test_without_a_tokenizer_the_engine_counts_and_truncation_is_applied(router: Any) -> None:
    engine_router, route = router
    counter = TokenCounter(engine_router, {})
    data = {"model": "fake", "prompt": ["one two three four", "five six"], "truncate_prompt_tokens": 3}
    counted = await counter.count(route, parse(data, CompletionRequest), "r")
    assert (counted.total, counted.longest) == (3 + 2, 3)


async def test_chat_is_counted_by_the_engine_with_its_tools(router: Any) -> None:
    engine_router, route = router
    counter = TokenCounter(engine_router, {})
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    data = {"model": "fake", "messages": [{"role": "user", "content": "one two"}], "tools": [tool, tool]}
    counted = await counter.count(route, parse(data, ChatCompletionRequest), "r")
    assert counted.total == 2 + 3 + 20  # the tools' schemas are prompt tokens
    assert fake.TOKENIZE_SERVED[-1]["tools"] == [tool, tool] and fake.TOKENIZE_SERVED[-1]["add_generation_prompt"]


SMOLLM = Path(__file__).resolve().parents[3] / "var" / "models" / "smollm2-135m-instruct"  # prepared by make setup
PLAIN = {"model": "fake", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}


@pytest.fixture
async def model_router() -> AsyncIterator[tuple[EngineRouter, EngineRoute]]:
    """A fake engine that counts with smollm2's own tokenizer and chat template, as vLLM does."""
    engine = FakeEngine(model_folder=SMOLLM)
    engine.start()
    route = EngineRoute(model="fake", url=engine.url)
    router = EngineRouter(GatewaySettings(routes=[route]))
    await router.start()
    yield router, route
    await router.stop()
    engine.stop()


async def test_a_plain_chat_is_counted_with_the_model_template_once_it_agrees_with_the_engine(
    model_router: Any,
) -> None:
    engine_router, route = model_router
    counter = TokenCounter(engine_router, {"fake": SMOLLM})
    before = len(fake.TOKENIZE_SERVED)
    first = await counter.count(route, parse(PLAIN, ChatCompletionRequest), "r1")
    assert len(fake.TOKENIZE_SERVED) - before == 1, "the first chat is counted by the engine: its context is unknown"
    second = await counter.count(route, parse(PLAIN, ChatCompletionRequest), "r2")
    probes = len(fake.TOKENIZE_SERVED) - before
    assert probes == 1 + 2 + 4, "then the tokenizer's check (2) and the template's (2 chats, with and without a turn)"
    assert second.total == first.total
    for n in range(5):
        turns = [*PLAIN["messages"], {"role": "assistant", "content": "ok"}] * n
        chat = dict(PLAIN, messages=turns + PLAIN["messages"])
        local = await counter.count(route, parse(chat, ChatCompletionRequest), f"r{n}")
        engine = fake.model_counter(SMOLLM)(dict(chat, add_generation_prompt=True))
        assert local.total == engine
    assert len(fake.TOKENIZE_SERVED) - before == probes, "no more round trips"
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for other in ({"tools": [tool]}, {"chat_template_kwargs": {"x": 1}}, {"continue_final_message": True}):
        await counter.count(route, parse({**PLAIN, **other}, ChatCompletionRequest), "other")
    named = {**PLAIN, "messages": [{"role": "user", "content": "hi", "name": "bob"}]}
    parts = {**PLAIN, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    for other in (named, parts):
        await counter.count(route, parse(other, ChatCompletionRequest), "other")
    assert len(fake.TOKENIZE_SERVED) - before == probes + 5, "anything but a plain chat is counted by the engine"


async def test_a_template_that_disagrees_with_the_engine_is_not_used(router: Any) -> None:
    engine_router, route = router  # the word-counting fake: smollm2's template counts otherwise
    counter = TokenCounter(engine_router, {"fake": SMOLLM})
    for n in range(3):
        counted = await counter.count(route, parse(PLAIN, ChatCompletionRequest), f"r{n}")
        assert counted.total == 1 + 3 + 2 + 3  # the engine's count
    assert fake.TOKENIZE_SERVED[-1]["messages"] == PLAIN["messages"], "still asked, every time"

"""A plain chat is counted in the gateway (the model's chat template and tokenizer) exactly as the real vLLM engine
counts it: the budget's reservation and the output cap rest on that count (issue #16, counting without a round
trip)."""

from __future__ import annotations

import aiohttp
import pytest

from appliance.gateway.counting import TokenCounter
from appliance.gateway.protocol import ChatCompletionRequest
from appliance.gateway.shape import parse
from appliance.gateway.upstream import EngineRouter
from appliance.settings import EngineRoute, GatewaySettings
from tests.integration.conftest import CHAT_MODEL, MODELS_CACHE_DIR, Appliance

pytestmark = pytest.mark.integration

CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [
        {"role": "user", "content": "  leading and trailing spaces  "},
        {"role": "assistant", "content": "Red, green, blue.\n\nAnd a blank line."},
        {"role": "user", "content": "東京 naïve café 🙂 <|im_start|> \t tabs"},
    ],
    [{"role": "assistant", "content": ""}, {"role": "user", "content": "x " * 3000}],
    [{"role": "system", "content": "only a system message"}],
]


async def test_plain_chats_are_counted_here_as_the_engine_counts_them(appliance: Appliance) -> None:
    url = appliance.engine_url(CHAT_MODEL)
    route = EngineRoute(model=CHAT_MODEL, url=url)
    router = EngineRouter(GatewaySettings(routes=[route]))
    await router.start()
    try:
        counter = TokenCounter(router, {CHAT_MODEL: MODELS_CACHE_DIR / CHAT_MODEL})
        await counter.count(route, parse({"model": CHAT_MODEL, "messages": CHATS[0]}, ChatCompletionRequest), "warm")
        async with aiohttp.ClientSession() as session:
            for messages in CHATS:
                for generation in (True, False):
                    body = {"model": CHAT_MODEL, "messages": messages, "add_generation_prompt": generation}
                    counted = await counter.count(route, parse(body, ChatCompletionRequest), "r")
                    async with session.post(url + "/tokenize", json=body) as response:
                        engine = (await response.json())["count"]
                    assert counted.total == engine, (messages, generation)
        assert counter.counts_chats_of(CHAT_MODEL), "the counts above were made here, not by the engine"
    finally:
        await router.stop()

"""Counting a request's prompt as the engine will see it, before the engine generates anything.

- chat: one call to the engine's ``/tokenize`` with the messages, the tools and the template options the
  request carries (the chat template is the engine's; only it knows the exact count); a Responses request the
  same way, through its chat view (:mod:`appliance.gateway.responses`), plus the context it continues;
- completions and embeddings: every prompt of the list. Token-id prompts are their length; texts are counted
  with the model's own ``tokenizer.json`` through ``tokenizers`` (no round trip per item), once that tokenizer
  has been checked against the engine's count on a probe; where it cannot be loaded or disagrees, the engine
  counts each distinct text (concurrently, a few at a time).

``truncate_prompt_tokens`` is applied as the engine applies it. The engine's ``max_model_len`` comes back with
every ``/tokenize`` answer and is remembered per engine: it bounds the output cap.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import msgspec
from tokenizers import Tokenizer

from appliance.gateway.shape import Prompt, PromptTokens, RequestShape
from appliance.gateway.upstream import EngineRouter
from appliance.lib.errors import UpstreamError
from appliance.settings import EngineRoute

log = logging.getLogger(__name__)

PROBE = "Counting check: Hello, world! 1234 -- naïve café, 東京, \t tabs\nand a newline."
_REMOTE_CONCURRENCY = 8
_LOCAL_INLINE = 16  # lists longer than this are encoded in a worker thread


class _Tokenizers:
    """The local tokenizer of each model, loaded and checked once (None: count with the engine)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self._folders = folders
        self._checked: dict[str, Tokenizer | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, route: EngineRoute, engine_count: Any) -> Tokenizer | None:
        if route.model in self._checked:
            return self._checked[route.model]
        lock = self._locks.setdefault(route.model, asyncio.Lock())
        async with lock:
            if route.model not in self._checked:
                self._checked[route.model] = await self._load(route, engine_count)
        return self._checked[route.model]

    async def _load(self, route: EngineRoute, engine_count: Any) -> Tokenizer | None:
        folder = self._folders.get(route.model)
        path = folder / "tokenizer.json" if folder is not None else None
        if path is None or not path.is_file():
            return None
        try:
            tokenizer = await asyncio.to_thread(Tokenizer.from_file, str(path))
        except Exception as exc:  # the tokenizers library raises plain Exception
            log.warning("tokenizer of %s not usable (%s): its engine counts prompts", route.model, exc)
            return None
        tokenizer.no_truncation()
        tokenizer.no_padding()
        for special in (True, False):
            local = len(tokenizer.encode(PROBE, add_special_tokens=special).ids)
            remote = await engine_count(PROBE, special)
            if local != remote:
                log.warning(
                    "tokenizer of %s counts %d tokens where its engine counts %d: the engine counts prompts",
                    route.model,
                    local,
                    remote,
                )
                return None
        return tokenizer


class TokenCounter:
    def __init__(self, router: EngineRouter, tokenizer_folders: dict[str, Path] | None = None) -> None:
        self._router = router
        self._tokenizers = _Tokenizers(tokenizer_folders or {})
        self._context: dict[str, int] = {}  # engine url -> max_model_len

    def context_length(self, route: EngineRoute) -> int | None:
        return self._context.get(route.url)

    async def count(self, route: EngineRoute, shape: RequestShape, request_id: str) -> PromptTokens:
        if shape.kind in ("chat", "responses"):
            view = shape.chat_view if shape.chat_view is not None else shape.body
            body = {key: view[key] for key in _CHAT_TOKENIZE if key in view}
            body.setdefault("add_generation_prompt", True)
            count = self._truncated(
                route, shape, await self._tokenize(route, dict(body, model=route.model), request_id)
            )
            count += shape.prior_tokens  # the earlier response a Responses request continues
            return PromptTokens(count, count)
        special = shape.body.get("add_special_tokens", True) is not False
        counts = [
            self._truncated(route, shape, n) for n in await self._items(route, shape.prompts, special, request_id)
        ]
        return PromptTokens(sum(counts), max(counts, default=0))

    def _truncated(self, route: EngineRoute, shape: RequestShape, count: int) -> int:
        keep = shape.truncation
        if keep is None:
            return count
        if keep < 0:  # -1: truncated to the model's context
            context = self._context.get(route.url)
            return count if context is None else min(count, context)
        return min(count, keep)

    async def _items(self, route: EngineRoute, prompts: list[Prompt], special: bool, request_id: str) -> list[int]:
        async def engine_count(text: str, add_special: bool) -> int:
            return await self._tokenize(
                route, {"model": route.model, "prompt": text, "add_special_tokens": add_special}, request_id
            )

        texts = [p for p in prompts if isinstance(p, str)]
        counted: dict[str, int] = {}
        if texts:
            tokenizer = await self._tokenizers.get(route, engine_count)
            if tokenizer is not None:
                counted = await _encode(tokenizer, texts, special)
            else:
                counted = await _remote(sorted(set(texts)), lambda text: engine_count(text, special))
        return [counted[p] if isinstance(p, str) else len(p) for p in prompts]

    async def _tokenize(self, route: EngineRoute, body: dict[str, Any], request_id: str) -> int:
        response = await self._router.open(route, "/tokenize", msgspec.json.encode(body), request_id)
        try:
            answer = msgspec.json.decode(await response.read())
            count = int(answer["count"])
            if isinstance(answer.get("max_model_len"), int):
                self._context[route.url] = answer["max_model_len"]
        except (msgspec.DecodeError, KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"The engine serving `{route.model}` could not count the prompt.") from exc
        finally:
            response.release()
        return count


# What the engine's chat template sees besides the messages (vLLM's TokenizeChatRequest takes them all).
_CHAT_TOKENIZE = (
    "messages",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template_kwargs",
)


async def _encode(tokenizer: Tokenizer, texts: list[str], special: bool) -> dict[str, int]:
    unique = sorted(set(texts))

    def encode() -> list[int]:
        return [len(e.ids) for e in tokenizer.encode_batch(unique, add_special_tokens=special)]

    counts = encode() if len(unique) <= _LOCAL_INLINE else await asyncio.to_thread(encode)
    return dict(zip(unique, counts, strict=True))


async def _remote(texts: list[str], count: Any) -> dict[str, int]:
    gate = asyncio.Semaphore(_REMOTE_CONCURRENCY)

    async def one(text: str) -> int:
        async with gate:
            return int(await count(text))

    return dict(zip(texts, await asyncio.gather(*(one(text) for text in texts)), strict=True))

"""Counting a request's prompt as the engine will see it, before the engine generates anything.

- chat: a plain chat (text messages of the system, user and assistant roles, no tools nor template options) is
  rendered with the model's own chat template and counted with its ``tokenizer.json``
  (:mod:`appliance.gateway.templates`), no round trip, once both agreed with the engine's counts on probe chats;
  any other chat (or where they disagree or are missing) is one call to the engine's ``/tokenize`` with the
  messages, the tools and the template options the request carries; a Responses request the same way, through its
  chat view (:mod:`appliance.gateway.responses`), plus the context it continues;
- completions and embeddings: every prompt of the list. Token-id prompts are their length; texts are counted
  with the model's own ``tokenizer.json`` through ``tokenizers`` (no round trip per item), once that tokenizer
  has been checked against the engine's count on a probe; where it cannot be loaded or disagrees, the engine
  counts each distinct text (concurrently, a few at a time).

``truncate_prompt_tokens`` is applied as the engine applies it. The engine's ``max_model_len`` comes back with
every ``/tokenize`` answer and is remembered per engine: it bounds the output cap (a chat is counted here only
for an engine whose ``max_model_len`` is known).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from tokenizers import Tokenizer

from appliance.gateway.shape import Prompt, PromptTokens, RequestShape
from appliance.gateway.templates import ChatTemplate, plain_chat
from appliance.gateway.upstream import EngineRouter
from appliance.lib.tokens import PieceCounts, count_tokens
from appliance.settings import EngineRoute

log = logging.getLogger(__name__)
T = TypeVar("T")

PROBE = "Counting check: Hello, world! 1234 -- naïve café, 東京, \t tabs\nand a newline."
_REMOTE_CONCURRENCY = 8
_LOCAL_INLINE = 16  # lists longer than this are encoded in a worker thread
_CHAT_INLINE = 16_384  # characters: a longer chat is rendered and encoded in a worker thread
_CHAT_INLINE_MESSAGES = 64  # as is one of more messages
PROBE_CHATS = (
    [{"role": "user", "content": PROBE}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": "Red, green and blue."},
        {"role": "user", "content": PROBE},
    ],
)


class _CheckedOnce(Generic[T]):
    """Per model, what counts here in place of its engine, loaded and checked against the engine once (None: the
    engine counts); concurrent first requests wait for the one check."""

    def __init__(self) -> None:
        self._checked: dict[str, T | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def usable(self, model: str) -> bool:
        return self._checked.get(model) is not None

    async def get(self, model: str, load: Callable[[], Awaitable[T | None]]) -> T | None:
        if model in self._checked:
            return self._checked[model]
        async with self._locks.setdefault(model, asyncio.Lock()):
            if model not in self._checked:
                self._checked[model] = await load()
        return self._checked[model]


class _Tokenizers:
    """The local tokenizer of each model, loaded and checked once (None: count with the engine)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self._folders = folders
        self._checked: _CheckedOnce[Tokenizer] = _CheckedOnce()

    async def get(self, route: EngineRoute, engine_count: Any) -> Tokenizer | None:
        return await self._checked.get(route.model, lambda: self._load(route, engine_count))

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


class _LocalChat:
    """A model's chat template and tokenizer, counting plain chats as its engine does: piece by piece between the
    template's special tokens, each piece's count remembered per tenant (appliance.lib.tokens.PieceCounts), where
    the tokenizer allows it."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer) -> None:
        self._template, self._tokenizer = template, tokenizer
        self._pieces = PieceCounts.for_tokenizer(tokenizer)

    def check_pieces(self) -> None:
        """Counting by pieces is used only if it gives the whole text's count on the probes."""
        if self._pieces is not None:
            rendered = [self._template.render(chat, generation) for chat in PROBE_CHATS for generation in (True, False)]
            if not self._pieces.agrees([*rendered, *(text.replace("\n", " \n ") for text in rendered)]):
                log.warning("a chat counted by pieces disagreed with its whole count: chats are counted whole")

    def count(
        self, messages: list[dict[str, str]], generation: bool, partition: str = "", *, in_thread: bool = False
    ) -> int:
        """The chat's tokens. ``in_thread``: tokenized without holding the GIL (appliance.lib.tokens), so the event
        loop goes on; on the loop itself a small chat keeps the lock (releasing it there, the loop would wait to
        take it back from any thread running Python)."""
        text = self._template.render(messages, generation)
        if self._pieces is not None:  # whole once it is not usable
            return self._pieces.count(text, partition, in_thread=in_thread)
        return count_tokens(self._tokenizer, text, in_thread=in_thread)

    async def count_async(self, messages: list[dict[str, str]], generation: bool, partition: str) -> int:
        """Small chats on the event loop; a long one (or one of many messages) in a worker thread."""
        if len(messages) <= _CHAT_INLINE_MESSAGES and sum(len(m["content"]) for m in messages) <= _CHAT_INLINE:
            return self.count(messages, generation, partition)
        return await asyncio.to_thread(functools.partial(self.count, messages, generation, partition, in_thread=True))


class _ChatTemplates:
    """Each model's local chat counting, loaded and checked once against its engine (None: the engine counts)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self._folders = folders
        self._checked: _CheckedOnce[_LocalChat] = _CheckedOnce()

    def checked(self, model: str) -> bool:
        return self._checked.usable(model)

    async def get(self, route: EngineRoute, tokenizer: Tokenizer | None, engine_count: Any) -> _LocalChat | None:
        return await self._checked.get(route.model, lambda: self._load(route, tokenizer, engine_count))

    async def _load(self, route: EngineRoute, tokenizer: Tokenizer | None, engine_count: Any) -> _LocalChat | None:
        folder = self._folders.get(route.model)
        template = await asyncio.to_thread(ChatTemplate.load, folder) if folder is not None else None
        if template is None or tokenizer is None:
            return None
        local = _LocalChat(template, tokenizer)
        try:
            local.check_pieces()
        except Exception as exc:  # a template this module does not render as the engine does
            log.warning("chat template of %s not rendered here (%s): its engine counts chats", route.model, exc)
            return None
        for messages in PROBE_CHATS:
            for generation in (True, False):
                try:
                    mine = local.count(messages, generation)
                except Exception as exc:  # a template this module does not render as the engine does
                    log.warning("chat template of %s not rendered here (%s): its engine counts chats", route.model, exc)
                    return None
                theirs = await engine_count(messages, generation)
                if mine != theirs:
                    log.warning(
                        "chat template of %s counts %d tokens where its engine counts %d: the engine counts chats",
                        route.model,
                        mine,
                        theirs,
                    )
                    return None
        return local


class TokenCounter:
    def __init__(self, router: EngineRouter, tokenizer_folders: dict[str, Path] | None = None) -> None:
        self._router = router
        self._tokenizers = _Tokenizers(tokenizer_folders or {})
        self._chats = _ChatTemplates(tokenizer_folders or {})
        self._context: dict[str, int] = {}  # engine url -> max_model_len

    def context_length(self, route: EngineRoute) -> int | None:
        return self._context.get(route.url)

    def counts_chats_of(self, model: str) -> bool:
        """Whether plain chats of ``model`` are counted here (its template and tokenizer agreed with its engine)."""
        return self._chats.checked(model)

    async def count(
        self, route: EngineRoute, shape: RequestShape, request_id: str, partition: str = ""
    ) -> PromptTokens:
        """``partition``: whose prompt (the tenant): what is remembered of one tenant's chats serves only its own."""
        if shape.kind in ("chat", "responses"):
            view = shape.chat_view if shape.chat_view is not None else shape.body
            body = {key: view[key] for key in _CHAT_TOKENIZE if key in view}
            body.setdefault("add_generation_prompt", True)
            count = self._truncated(route, shape, await self._chat(route, body, request_id, partition))
            count += shape.prior_tokens  # the earlier response a Responses request continues
            return PromptTokens(count, count)
        special = shape.body.get("add_special_tokens", True) is not False
        counts = [
            self._truncated(route, shape, n) for n in await self._items(route, shape.prompts, special, request_id)
        ]
        return PromptTokens(sum(counts), max(counts, default=0))

    async def _chat(self, route: EngineRoute, body: dict[str, Any], request_id: str, partition: str) -> int:
        plain = plain_chat(body)
        if plain is not None and route.url in self._context:
            tokenizer = await self._tokenizers.get(route, self._text_count(route, request_id))
            local = await self._chats.get(route, tokenizer, self._chat_count(route, request_id))
            if local is not None:
                try:
                    return await local.count_async(*plain, partition)
                except Exception:  # the template refuses this chat (say, roles out of turn): the engine says why
                    log.debug("chat not counted locally for %s", route.model, exc_info=True)
        return await self._tokenize(route, dict(body, model=route.model), request_id)

    def _text_count(self, route: EngineRoute, request_id: str) -> Any:
        """The engine's count of a text (checks the local tokenizer, counts where it cannot)."""

        async def count(text: str, add_special: bool) -> int:
            body = {"model": route.model, "prompt": text, "add_special_tokens": add_special}
            return await self._tokenize(route, body, request_id)

        return count

    def _chat_count(self, route: EngineRoute, request_id: str) -> Any:
        """The engine's count of a plain chat (checks the local chat template)."""

        async def count(messages: list[dict[str, str]], generation: bool) -> int:
            body = {"model": route.model, "messages": messages, "add_generation_prompt": generation}
            return await self._tokenize(route, body, request_id)

        return count

    def _truncated(self, route: EngineRoute, shape: RequestShape, count: int) -> int:
        keep = shape.truncation
        if keep is None:
            return count
        if keep < 0:  # -1: truncated to the model's context
            context = self._context.get(route.url)
            return count if context is None else min(count, context)
        return min(count, keep)

    async def _items(self, route: EngineRoute, prompts: list[Prompt], special: bool, request_id: str) -> list[int]:
        engine_count = self._text_count(route, request_id)
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
        count, answer = await self._router.tokenize(route, body, request_id)
        if isinstance(answer.get("max_model_len"), int):
            self._context[route.url] = answer["max_model_len"]
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

    def encode_inline() -> list[int]:  # on the event loop: a few texts, holding the GIL (see _LocalChat.count)
        return [len(tokenizer.encode(text, add_special_tokens=special).ids) for text in unique]

    def encode_releasing() -> list[int]:  # in a thread: encode_batch lets the event loop run meanwhile
        return [len(e.ids) for e in tokenizer.encode_batch(unique, add_special_tokens=special)]

    counts = encode_inline() if len(unique) <= _LOCAL_INLINE else await asyncio.to_thread(encode_releasing)
    return dict(zip(unique, counts, strict=True))


async def _remote(texts: list[str], count: Any) -> dict[str, int]:
    gate = asyncio.Semaphore(_REMOTE_CONCURRENCY)

    async def one(text: str) -> int:
        async with gate:
            return int(await count(text))

    return dict(zip(texts, await asyncio.gather(*(one(text) for text in texts)), strict=True))

"""A model's chat template, rendered in the gateway as the engine renders it, to count a chat's prompt without a
round trip to the engine.

vLLM renders chat templates with Hugging Face's ``apply_chat_template``: a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter, ``raise_exception``
and ``strftime_now``, and the tokenizer's special tokens as variables; the text is then tokenized without adding
special tokens. This module does the same with the model's own files (``chat_template.jinja`` or the
``chat_template`` of ``tokenizer_config.json``). It is used only for the request shapes it covers
(:func:`plain_chat`), and only once its counts agreed with the engine's on probes (``counting.py``): where it does
not, the engine counts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_PLAIN_ROLES = frozenset({"system", "user", "assistant"})


class ChatTemplate:
    """One model's chat template and special tokens."""

    def __init__(self, source: str, variables: dict[str, str]) -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda format: datetime.now(UTC).strftime(format)
        self._template = environment.from_string(source)
        self._variables = variables

    @classmethod
    def load(cls, folder: Path) -> ChatTemplate | None:
        """The template of the model in ``folder``, or None when it has none (or it does not compile)."""
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or config.get("split_special_tokens"):
            return None  # (special tokens' text in a message counted piece by piece: the engine counts those)
        source: Any = None
        try:
            source = (folder / "chat_template.jinja").read_text()
        except OSError:
            source = config.get("chat_template")
        if not isinstance(source, str):
            return None  # none, or several named templates: the engine decides which
        variables = {name: _token_text(config.get(name)) for name in _SPECIAL}
        try:
            return cls(source, {name: text for name, text in variables.items() if text is not None})
        except TemplateError:
            return None

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self._variables,
        )


def plain_chat(body: dict[str, Any]) -> tuple[list[dict[str, str]], bool] | None:
    """(messages, add_generation_prompt) of a chat this module renders as the engine does: text messages of the
    system, user and assistant roles and nothing else that reaches the template (no tools, no template options,
    no continued final message, no added special tokens: each absent or at its default); None for any other."""
    defaults = {"tools": None, "continue_final_message": False, "add_special_tokens": False}
    for name, value in body.items():
        if name in ("messages", "add_generation_prompt") or value == defaults.get(name, ...) or value == {}:
            continue
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    plain = []
    for message in messages:
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            return None
        role, content = message.get("role"), message.get("content")
        if role not in _PLAIN_ROLES or not isinstance(content, str):
            return None
        plain.append({"role": role, "content": content})
    generation = body.get("add_generation_prompt", True)
    if not isinstance(generation, bool):
        return None
    return plain, generation


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TemplateError(message)

"""JSON request bodies decoded with a bound on nesting: a body nested deeper than :data:`MAX_DEPTH` is refused
(400, ``json_too_deep``) before any handler sees it. Without the bound a few hundred kilobytes of ``[[[[`` made the
decoder reach the interpreter's recursion limit inside the framework, a 500, and values nested a few hundred deep
reached later code (validation, audit detail, logging) that recurses too."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Any

import msgspec
from litestar import Request

from appliance.lib.errors import InvalidRequestError

MAX_DEPTH = 64  # no OpenAI-shaped or admin body comes near it; tool schemas nest a dozen levels at most


def too_deep(*, unread: bool = False) -> InvalidRequestError:
    """The refusal; ``unread``: found before the body was read in full, whose rest is not read (the connection
    is closed instead)."""
    return InvalidRequestError(
        f"The JSON body is nested deeper than {MAX_DEPTH} levels.",
        code="json_too_deep",
        headers={"Connection": "close"} if unread else None,
        paced=True,
    )


_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # up to a closing quote or a final backslash
_BRACKET = re.compile(rb"[\[\]{}]")
_OPENING = frozenset(b"[{")


class DepthScan:
    """The nesting depth of a JSON body as its chunks arrive, so that a body nested too deeply is refused at its
    first kilobytes, not once megabytes of it were read. It counts brackets outside strings (escapes included,
    across chunk boundaries), mostly with byte counts, and refuses only when the depth it sees passes
    :data:`MAX_DEPTH`, which a decoder would see too: it never refuses a body :func:`check_depth` accepts.
    Malformed JSON is left to the decoder."""

    __slots__ = ("_depth", "_escaped", "_in_string")

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; True once the body is surely nested deeper than :data:`MAX_DEPTH`."""
        pos, end = 0, len(chunk)
        while pos < end:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    pos += 1
                    continue
                match = _STRING_REST.match(chunk, pos)
                pos = match.end() if match else pos
                if pos >= end:
                    return False
                if chunk[pos] == 0x5C:  # a backslash ending the chunk: it escapes the next chunk's first byte
                    self._escaped = True
                else:
                    self._in_string = False
                pos += 1
                continue
            quote = chunk.find(b'"', pos)
            stop = end if quote < 0 else quote
            if self._structure(chunk, pos, stop):
                return True
            pos = stop
            if quote >= 0:
                self._in_string = True
                pos += 1
        return False

    def _structure(self, chunk: bytes, start: int, stop: int) -> bool:
        opens = chunk.count(b"[", start, stop) + chunk.count(b"{", start, stop)
        closes = chunk.count(b"]", start, stop) + chunk.count(b"}", start, stop)
        if self._depth + opens <= MAX_DEPTH or closes == 0:
            self._depth = max(0, self._depth + opens - closes)
            return self._depth > MAX_DEPTH
        for bracket in _BRACKET.finditer(chunk, start, stop):  # many brackets both ways: follow them
            if chunk[bracket.start()] in _OPENING:
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    return True
            else:
                self._depth = max(0, self._depth - 1)
        return False


def check_depth(value: Any, body: bytes) -> None:
    """Refuse ``value`` (decoded from ``body``) when it nests deeper than :data:`MAX_DEPTH` arrays or objects."""
    if body.count(b"[") + body.count(b"{") <= MAX_DEPTH:
        return  # cannot nest deeper than it has brackets: the common case costs two byte counts
    level: list[tuple[Any, int]] = [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            raise too_deep()
        level.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def decode_bounded(body: bytes) -> Any:
    """``body`` decoded (``msgspec.DecodeError`` when it is not JSON), refused when nested too deeply."""
    try:
        value = msgspec.json.decode(body)
    except RecursionError:
        raise too_deep() from None
    check_depth(value, body)
    return value


class BoundedJsonRequest(Request[Any, Any, Any]):
    """The app's request class: what handlers read with ``data`` or ``request.json()`` is depth-bounded, and a
    body that says it is JSON is refused as soon as the part read nests too deeply."""

    async def stream(self) -> AsyncGenerator[bytes, None]:
        scan = DepthScan() if "json" in self.headers.get("content-type", "") else None
        async for chunk in super().stream():
            if scan is not None and chunk and scan.feed(chunk):
                raise too_deep(unread=True)
            yield chunk

    async def json(self) -> Any:
        try:
            value = await super().json()
        except RecursionError:
            raise too_deep() from None
        check_depth(value, await self.body())
        return value

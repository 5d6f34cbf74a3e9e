"""JSON request bodies decoded with a bound on nesting: a body nested deeper than :data:`MAX_DEPTH` is refused
(400, ``json_too_deep``) before any handler sees it. Without the bound a few hundred kilobytes of ``[[[[`` made the
decoder reach the interpreter's recursion limit inside the framework, a 500, and values nested a few hundred deep
reached later code (validation, audit detail, logging) that recurses too."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request

from appliance.lib.errors import InvalidRequestError

MAX_DEPTH = 64  # no OpenAI-shaped or admin body comes near it; tool schemas nest a dozen levels at most


def too_deep() -> InvalidRequestError:
    return InvalidRequestError(f"The JSON body is nested deeper than {MAX_DEPTH} levels.", code="json_too_deep")


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
    """The app's request class: what handlers read with ``data`` or ``request.json()`` is depth-bounded."""

    async def json(self) -> Any:
        try:
            value = await super().json()
        except RecursionError:
            raise too_deep() from None
        check_depth(value, await self.body())
        return value

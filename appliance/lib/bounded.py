"""Bounding what a client sends before it is kept: a value longer than its column is cut, with a marker and a
hash of the whole value (so two long values stay distinguishable, and a known value can be matched), and
characters the databases refuse (NUL, lone surrogates) are replaced. Applied where a value enters an audit
record or a usage row, so no client can make a record unwritable nor make it megabytes long."""

from __future__ import annotations

import hashlib
from typing import Any

MARKER = "\u2026"  # "…", then 16 hex digits of the whole value's SHA-256
_DIGEST_CHARS = 16
DETAIL_TEXT_CHARS = 1000  # a string inside a record's JSON detail
DETAIL_ITEMS = 100  # keys of one object, items of one list
DETAIL_DEPTH = 6


def clean(value: str) -> str:
    """``value`` as text every database stores: no NUL, no lone surrogate."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def bounded(value: str | None, limit: int) -> str | None:
    """``value`` cleaned and at most ``limit`` characters: when cut, it ends with ``…`` and the first 16 hex
    digits of the SHA-256 of the whole (cleaned) value."""
    if value is None:
        return None
    value = clean(value)
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]
    keep = max(0, limit - len(MARKER) - _DIGEST_CHARS)
    return f"{value[:keep]}{MARKER}{digest}"[:limit]


def bounded_detail(value: Any, depth: int = 0) -> Any:
    """A JSON detail with every string bounded, and objects and lists neither too long nor too deep."""
    if isinstance(value, str):
        return bounded(value, DETAIL_TEXT_CHARS)
    if depth >= DETAIL_DEPTH and isinstance(value, dict | list | tuple):
        return f"{MARKER}nested too deep"
    if isinstance(value, dict):
        items = list(value.items())
        out = {bounded(str(k), 100): bounded_detail(v, depth + 1) for k, v in items[:DETAIL_ITEMS]}
        if len(items) > DETAIL_ITEMS:
            out[MARKER] = f"{len(items) - DETAIL_ITEMS} more keys"
        return out
    if isinstance(value, list | tuple):
        out_list = [bounded_detail(v, depth + 1) for v in value[:DETAIL_ITEMS]]
        if len(value) > DETAIL_ITEMS:
            out_list.append(f"{MARKER}{len(value) - DETAIL_ITEMS} more items")
        return out_list
    return value

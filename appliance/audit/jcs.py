"""RFC 8785 JSON Canonicalization Scheme (JCS): the one byte string a JSON value has, so that anyone can hash a
record the way the appliance did from the record alone.

Strings are written as ECMAScript's ``JSON.stringify`` writes them (only ``"``, ``\\`` and control characters
escaped, lone surrogates as ``\\udxxx``), numbers as ECMAScript writes a double (shortest round trip; integers
beyond 2**53 lose precision as they would there), object members sorted by the UTF-16 code units of their names.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_SAFE = 2**53


# Writes RFC 8785 for the values :func:`_plain` admits: Python's encoder escapes strings as JSON.stringify does
# (given ensure_ascii=False), and sorts names by code point, which is their UTF-16 order below U+D800.
_PLAIN = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 bytes of ``value`` (dict with str keys, list/tuple, str, int, float, bool, None)."""
    try:
        plain = _plain(value)
    except RecursionError:  # nested deeper than the check reaches: the general writer's own limit applies
        plain = False
    if plain:  # an audit record, nearly always: one pass of the C encoder
        try:
            return _PLAIN.encode(value).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: escaped below, as JSON.stringify does
            pass
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts).encode("utf-8")


def _plain(value: Any) -> bool:
    """Whether Python's encoder writes ``value`` as RFC 8785 does: no floats (ECMAScript writes them its own
    way), integers within 2**53, object names of characters below U+D800 only (beyond, code point order and
    UTF-16 order differ), and only the built-in types themselves (a subclass may encode otherwise)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_MAX_SAFE <= value <= _MAX_SAFE)
    if kind is dict:
        return all(type(k) is str and (k.isascii() or max(k) < "\ud800") and _plain(v) for k, v in value.items())
    if kind is list or kind is tuple:
        return all(_plain(item) for item in value)
    return False


def _write(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, int):
        out.append(str(value) if -_MAX_SAFE <= value <= _MAX_SAFE else number(float(value)))
    elif isinstance(value, float):
        out.append(number(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if not isinstance(key, str):
                raise TypeError(f"JSON object names are strings, not {type(key).__name__}")
            if i:
                out.append(",")
            out.append(_string(key))
            out.append(":")
            _write(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out)
        out.append("]")
    else:
        raise TypeError(f"{type(value).__name__} is not a JSON value")


def _utf16_key(key: Any) -> bytes:
    return key.encode("utf-16-be", "surrogatepass") if isinstance(key, str) else b""


def _string(text: str) -> str:
    # Python's encoder escapes exactly what JSON.stringify escapes (with lower-case hex), given
    # ensure_ascii=False; lone surrogates are escaped as well-formed JSON.stringify (ES2019) does.
    encoded = json.dumps(text, ensure_ascii=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", encoded)


def number(value: float) -> str:
    """ECMAScript's Number.prototype.toString of a finite double (RFC 8785 section 3.2.2.3)."""
    if not math.isfinite(value):
        raise ValueError("NaN and infinities are not JSON numbers")
    if value == 0:
        return "0"  # and -0
    sign = "-" if value < 0 else ""
    mantissa, _, exp = repr(abs(value)).partition("e")  # shortest round-trip digits
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exp) if exp else 0)  # value = 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = f"{digits[:n]}.{digits[n:]}"
    elif -6 < n <= 0:
        text = f"0.{'0' * -n}{digits}"
    else:
        e = n - 1
        exponent = f"e{'+' if e >= 0 else '-'}{abs(e)}"
        text = digits + exponent if k == 1 else f"{digits[0]}.{digits[1:]}{exponent}"
    return sign + text

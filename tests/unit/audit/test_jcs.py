"""Record bytes are RFC 8785 (JCS): checked against the reference implementation's test data."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.audit.jcs import _write, canonicalize, number

VECTORS = Path(__file__).parent / "vectors" / "jcs"


@pytest.mark.parametrize("name", sorted(p.name for p in (VECTORS / "input").iterdir()))
def test_reference_inputs_canonicalize_to_the_reference_outputs(name: str) -> None:
    value = json.loads((VECTORS / "input" / name).read_text(encoding="utf-8"))
    assert canonicalize(value) == (VECTORS / "output" / name).read_bytes()


def _es6_test_values() -> Iterator[int]:
    """The reference number test sequence: fixed values, 2000 subnormal neighbours, then SHA-256 chained."""
    yield from (int(h, 16) for h in (VECTORS / "es6-static-u64.txt").read_text().split())
    yield from (0x0010000000000000 + i for i in range(2000))
    block = bytes(32)
    while True:
        block = hashlib.sha256(block).digest()
        for (bits,) in struct.iter_unpack("<Q", block):
            value = struct.unpack("<d", struct.pack("<Q", bits))[0]
            if value != 0.0 and value == value and abs(value) != float("inf"):
                yield bits


@pytest.mark.parametrize(
    ("lines", "sha256"),
    [
        (1000, "be18b62b6f69cdab33a7e0dae0d9cfa869fda80ddc712221570f9f40a5878687"),
        (10000, "b9f7a8e75ef22a835685a52ccba7f7d6bdc99e34b010992cbc5864cd12be6892"),
    ],
)
def test_numbers_serialize_as_ecmascript_does(lines: int, sha256: str) -> None:
    digest = hashlib.sha256()
    for bits in itertools.islice(_es6_test_values(), lines):
        value = struct.unpack("<d", struct.pack("<Q", bits))[0]
        digest.update(f"{bits:x},{number(value)}\n".encode())
    assert digest.hexdigest() == sha256


def test_rfc_8785_examples() -> None:
    # section 3.2.2 (literals, numbers, a string with escapes) and 3.2.3 (members sorted by UTF-16 code units)
    value = json.loads(
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        '"string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/", "literals": [null, true, false]}'
    )
    assert (
        canonicalize(value)
        == (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()
    )
    names = {"\u20ac": 1, "\r": 2, "\ufb33": 3, "1": 4, "\U0001f600": 5, "\u0080": 6, "\u00f6": 7}
    assert list(json.loads(canonicalize(names))) == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_what_is_not_json_is_refused() -> None:
    for value in (float("nan"), float("inf"), {1: "x"}, b"bytes"):
        with pytest.raises((TypeError, ValueError)):
            canonicalize(value)
    assert canonicalize("\ud800") == b'"\\ud800"'  # a lone surrogate, escaped as JSON.stringify does
    assert canonicalize(2**60) == b"1152921504606847000"  # as JavaScript prints 2 ** 60 and canonicalize(-0.0) == b"0"


def _written(value: Any) -> bytes:
    """The value written by the general writer alone (what the C encoder's shortcut must equal)."""
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts).encode("utf-8")


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec=None, categories=None), max_size=12),  # every code point, lone surrogates too
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(st.characters(codec=None), max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)


@given(_JSON)
@settings(max_examples=3000, deadline=None)
def test_the_shortcut_through_the_c_encoder_writes_the_same_bytes(value: Any) -> None:
    """Records are canonicalized with Python's C encoder where it writes RFC 8785 (no floats, integers within
    2**53, names below U+D800): for any value at all, the bytes are the general writer's."""
    assert canonicalize(value) == _written(value)


def test_the_shortcut_leaves_to_the_general_writer_what_it_would_write_otherwise() -> None:
    # UTF-16 order puts U+1F600 (a surrogate pair) before U+FB33; code point order would not.
    assert canonicalize({"\ufb33": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ufb33":1}'.encode()
    assert canonicalize({"a": 2**53 + 1}) == b'{"a":9007199254740992}'
    assert canonicalize([1.0, "\ud800"]) == b'[1,"\\ud800"]'
    assert (
        canonicalize({"t": True, "n": None, "x": "\u2028\x7f\x1f"})
        == '{"n":null,"t":true,"x":"\u2028\x7f\\u001f"}'.encode()
    )


def test_a_value_nested_deeper_than_the_shortcuts_check_reaches_is_still_written() -> None:
    value: list[Any] = []
    for _ in range(450):  # the check takes about two frames a level, the general writer one
        value = [value]
    assert canonicalize(value) == b"[" * 451 + b"]" * 451

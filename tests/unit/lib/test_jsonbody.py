"""The streaming depth check (appliance/lib/jsonbody.py, DepthScan) agrees with the decoder's: on valid JSON cut
into chunks anywhere (inside strings, between a backslash and what it escapes), it refuses exactly the bodies
nested deeper than MAX_DEPTH, whatever brackets, quotes and escapes their strings hold; and a body that is too
deep is refused by the app before it is read in full."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.lib.errors import InvalidRequestError
from appliance.lib.jsonbody import MAX_DEPTH, DepthScan, check_depth
from appliance.settings import Settings
from tests.support.gateway import admin_headers

TRICKY = ["[", "]", "{", "}", '"', "\\", "\\[", '\\"', "[[[[", "}}}", "é", "\n", "x"]


def value(rng: random.Random, depth: int, target: int) -> object:
    if depth >= target or rng.random() < 0.15:
        return rng.choice([1, 2.5, None, True, "".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 30)))])
    if rng.random() < 0.5:
        return [value(rng, depth + 1, target) for _ in range(rng.randint(1, 3))]
    keys = ["".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 8))) + str(n) for n in range(rng.randint(1, 3))]
    return {key: value(rng, depth + 1, target) for key in keys}


def chunks(rng: random.Random, body: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 12)))) if len(body) > 1 else []
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def deep(levels: int, rng: random.Random) -> object:
    inner: object = "".join(rng.choice(TRICKY) for _ in range(10))
    for _ in range(levels):
        inner = [inner] if rng.random() < 0.5 else {'k[{\\"': inner}
    return inner


def too_deep(decoded: object, body: bytes) -> bool:
    try:
        check_depth(decoded, body)
    except InvalidRequestError:
        return True
    return False


@pytest.mark.parametrize("seed", range(40))
def test_the_scan_refuses_exactly_what_the_decoder_refuses(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        decoded = deep(rng.randint(MAX_DEPTH - 3, MAX_DEPTH + 3), rng) if rng.random() < 0.4 else None
        if decoded is None:
            decoded = value(rng, 0, rng.randint(1, 12))
        body = json.dumps(decoded, ensure_ascii=rng.random() < 0.5).encode()
        scan = DepthScan()
        refused = any(scan.feed(piece) for piece in chunks(rng, body))
        assert refused == too_deep(decoded, body), body[:200]


def test_a_string_full_of_brackets_is_not_nesting() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "[" * 5000 + '\\"{' * 100}]}).encode()
    scan = DepthScan()
    assert not any(scan.feed(body[n : n + 7]) for n in range(0, len(body), 7))


async def test_a_megabyte_of_nesting_is_refused_without_reading_it(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings)
    body = b'{"name":' + b"[" * 500_000 + b"]" * 500_000 + b"}"
    pieces = [body[start : start + 65536] for start in range(0, len(body), 65536)]
    read: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:  # the body as the server hands it over, counting what the app read
        read.append(1)
        if len(read) > len(pieces):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": pieces[len(read) - 1], "more_body": len(read) < len(pieces)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    token = admin_headers(settings)["Authorization"]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/admin/tenants",
        "raw_path": b"/admin/tenants",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", token.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    async with AsyncTestClient(app=app):  # started: its lifespan ran
        await app(scope, receive, send)  # type: ignore[arg-type]
    start = next(message for message in sent if message["type"] == "http.response.start")
    answer = json.loads(
        b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    )
    assert start["status"] == 400 and answer["error"]["code"] == "json_too_deep"
    assert (b"connection", b"close") in [(name.lower(), value) for name, value in start["headers"]]
    assert len(read) == 1, f"{len(read)} of {len(pieces)} chunks read before the refusal"

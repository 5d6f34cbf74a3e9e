"""JWKS caching: on disk for restarts, refreshed on an unknown kid at most once per interval."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from appliance.identity.signing import SigningKey
from appliance.identity.tokens import JwksCache, key_algorithm


class Issuer:
    """Serves its current JWKS; counts fetches (the remote issuer of a Keycloak node, here in process)."""

    def __init__(self) -> None:
        self.keys = [SigningKey(ec.generate_private_key(ec.SECP256R1()))]
        self.fetches = 0
        self.down = False

    async def fetch(self) -> dict[str, Any]:
        self.fetches += 1
        if self.down:
            raise ConnectionError("issuer unreachable")
        return {"keys": [k.public_jwk for k in self.keys]}


async def test_unknown_kids_refresh_at_most_once_per_interval(tmp_path: Path) -> None:
    issuer = Issuer()
    cache = JwksCache(issuer.fetch, tmp_path / "jwks.json", min_refresh_s=60)
    assert await cache.key(issuer.keys[0].kid) is not None
    for n in range(20):
        assert await cache.key(f"forged-{n}") is None
    assert issuer.fetches == 1


async def test_a_rotated_key_is_picked_up_and_cached_keys_survive_a_restart(tmp_path: Path) -> None:
    issuer = Issuer()
    cache = JwksCache(issuer.fetch, tmp_path / "jwks.json", min_refresh_s=0)
    assert await cache.key(issuer.keys[0].kid) is not None
    issuer.keys.append(SigningKey(ec.generate_private_key(ec.SECP256R1())))
    assert await cache.key(issuer.keys[1].kid) is not None

    issuer.down = True  # a restart while the issuer is unreachable: the disk cache still has both keys
    restarted = JwksCache(issuer.fetch, tmp_path / "jwks.json", min_refresh_s=0)
    assert await restarted.key(issuer.keys[1].kid) is not None
    assert await restarted.key("unknown") is None  # the failed refresh keeps what was cached


def test_the_algorithm_comes_from_the_key() -> None:
    assert key_algorithm({"kty": "EC", "crv": "P-256"}) == "ES256"
    assert key_algorithm({"kty": "RSA", "alg": "RS256"}) == "RS256"
    assert key_algorithm({"kty": "OKP", "crv": "Ed25519"}) == "EdDSA"
    assert key_algorithm({"kty": "RSA", "alg": "HS256"}) is None
    assert key_algorithm({"kty": "oct"}) is None
    assert key_algorithm({"kty": "EC", "crv": "P-256", "alg": "RS256"}) is None


async def test_a_key_removed_from_the_issuers_jwks_stops_being_trusted_within_a_bounded_time() -> None:
    """Against a local JWKS server over HTTP (how a Keycloak node's keys are fetched)."""
    from aiohttp import web

    from appliance.identity.setup import _remote_jwks
    from tests.support.fake_engine import free_port

    issuer = Issuer()
    old, new = issuer.keys[0], SigningKey(ec.generate_private_key(ec.SECP256R1()))

    async def certs(_request: web.Request) -> web.Response:
        return web.json_response(await issuer.fetch())

    app = web.Application()
    app.router.add_get("/certs", certs)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        cache = JwksCache(_remote_jwks(f"http://127.0.0.1:{port}/certs"), None, min_refresh_s=0.2)
        assert await cache.key(old.kid) is not None
        issuer.keys = [new]  # the old key is withdrawn (compromised, rotated out)
        deadline = asyncio.get_running_loop().time() + 5 * 0.2 + 0.5
        while await cache.key(old.kid) is not None:
            assert asyncio.get_running_loop().time() < deadline, "the withdrawn key is still trusted"
            await asyncio.sleep(0.1)
        assert await cache.key(new.kid) is not None
        fetches = issuer.fetches
        for _ in range(50):  # known kids do not fetch on every request: at most once per schedule
            await cache.key(new.kid)
        assert issuer.fetches - fetches <= 1
    finally:
        await runner.cleanup()

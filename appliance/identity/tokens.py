"""Access-token validation: one path for Keycloak and for the embedded issuer.

The signature is checked against the issuer's JWKS, with the algorithm taken from the *key* (never from
the token alone: that is what defeats ``alg: none`` and HS256-with-the-public-key). Then ``iss``, ``aud``,
``exp``/``nbf`` (small leeway) and ``azp``; roles come from ``realm_access.roles`` and
``resource_access.<api client>.roles``; the tenant from a ``tenant`` claim.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK

from appliance.identity.models import ROLES
from appliance.lib.errors import AuthenticationError
from appliance.lib.principal import Principal

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS = {"RS256", "ES256", "EdDSA"}
_ALGORITHM_BY_KEY: dict[tuple[object, object], str] = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
}

FetchJwks = Callable[[], Awaitable[dict[str, Any]]]


def key_algorithm(jwk: dict[str, Any]) -> str | None:
    """The one algorithm a key may verify, from its type (and its ``alg`` when it states one)."""
    derived = _ALGORITHM_BY_KEY.get((jwk.get("kty"), jwk.get("crv") if jwk.get("kty") != "RSA" else None))
    stated = jwk.get("alg")
    if derived is None or (stated is not None and stated != derived):
        return None
    return derived


REFRESH_EVERY = 5  # known keys are re-fetched every REFRESH_EVERY x min_refresh_s


class JwksCache:
    """The issuer's signing keys by ``kid``: cached on disk for restarts, refreshed on an unknown ``kid``
    at most once per ``min_refresh_s`` (so a flood of forged kids cannot hammer the issuer), and re-fetched
    on a schedule, every ``REFRESH_EVERY`` x ``min_refresh_s``, so a key the issuer withdrew stops being
    trusted within that time (5 minutes by default). While the issuer is unreachable the cached keys stay."""

    def __init__(self, fetch: FetchJwks, cache_file: Path | None, min_refresh_s: float = 60.0) -> None:
        self._fetch = fetch
        self._cache_file = cache_file
        self._min_refresh_s = min_refresh_s
        self._refresh_every_s = REFRESH_EVERY * min_refresh_s
        self._keys: dict[str, tuple[PyJWK, str]] = {}
        self._last_refresh = -float("inf")
        self._lock = asyncio.Lock()
        if cache_file is not None and cache_file.exists():
            try:
                self._load(json.loads(cache_file.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable JWKS cache %s: %s", cache_file, exc)

    def _load(self, jwks: dict[str, Any]) -> None:
        keys: dict[str, tuple[PyJWK, str]] = {}
        for jwk in jwks.get("keys", []):
            kid, algorithm = jwk.get("kid"), key_algorithm(jwk)
            if not kid or algorithm is None or jwk.get("use", "sig") != "sig":
                continue
            try:
                keys[kid] = (PyJWK(jwk, algorithm), algorithm)
            except jwt.PyJWKError as exc:
                log.warning("skipping JWKS key %s: %s", kid, exc)
        self._keys = keys

    async def key(self, kid: str) -> tuple[PyJWK, str] | None:
        if time.monotonic() - self._last_refresh >= self._refresh_every_s:
            async with self._lock:
                if time.monotonic() - self._last_refresh >= self._refresh_every_s:
                    await self._refresh()
        found = self._keys.get(kid)
        if found is not None:
            return found
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._last_refresh >= self._min_refresh_s:
                await self._refresh()
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._last_refresh = time.monotonic()
        try:
            jwks = await self._fetch()
        except Exception as exc:  # an unreachable issuer must not take valid cached keys away
            log.warning("JWKS refresh failed: %s", exc)
            return
        self._load(jwks)
        if self._cache_file is not None:
            self._cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(jwks), encoding="utf-8")
            tmp.replace(self._cache_file)


class TokenValidator:
    def __init__(
        self,
        jwks: JwksCache,
        *,
        issuer: str,
        audience: str,
        api_client_id: str,
        allowed_clients: list[str] | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._api_client_id = api_client_id
        self._allowed_clients = set(allowed_clients) if allowed_clients else None
        self._leeway_s = leeway_s

    async def validate(self, token: str) -> tuple[Principal, dict[str, Any]]:
        """The principal and the verified claims; any failure is the same 401 to the caller."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthenticationError() from None
        kid, alg = header.get("kid"), header.get("alg")
        if not isinstance(kid, str) or not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            raise AuthenticationError()
        found = await self._jwks.key(kid)
        if found is None:
            raise AuthenticationError()
        key, algorithm = found
        if alg != algorithm:
            raise AuthenticationError()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            log.info("token refused: %s", type(exc).__name__)
            raise AuthenticationError() from None
        client = claims.get("azp")
        if not isinstance(client, str) or (self._allowed_clients is not None and client not in self._allowed_clients):
            raise AuthenticationError()
        return self._principal(claims, client), claims

    def _principal(self, claims: dict[str, Any], client: str) -> Principal:
        roles: set[str] = set()
        realm = claims.get("realm_access")
        if isinstance(realm, dict) and isinstance(realm.get("roles"), list):
            roles.update(r for r in realm["roles"] if isinstance(r, str))
        resources = claims.get("resource_access")
        if isinstance(resources, dict):
            api = resources.get(self._api_client_id)
            if isinstance(api, dict) and isinstance(api.get("roles"), list):
                roles.update(r for r in api["roles"] if isinstance(r, str))

        def text(name: str) -> str | None:
            value = claims.get(name)
            return value if isinstance(value, str) and value else None

        return Principal(
            kind="token",
            subject=str(claims["sub"]),
            roles=frozenset(roles.intersection(ROLES)),
            tenant_id=text("tenant"),
            workflow_id=text("workflow"),
            agent_id=text("agent"),
            client_id=client,
        )

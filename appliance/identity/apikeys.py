"""Appliance API keys: ``apk_<id>_<secret>``. Only an HMAC-SHA256 of the secret (keyed with a pepper kept
in a 0600 file, not in the database) is stored; a revocation applies within a second in every gateway process,
an expiry on the very next request."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from appliance.db.engine import writing
from appliance.identity.models import ApiKey
from appliance.lib.addresses import ClientCounts, ClientNetworks
from appliance.lib.errors import AuthenticationError
from appliance.lib.principal import ADMIN, USER, Principal
from appliance.lib.recheck import RECHECK_S, Recheck
from appliance.lib.secret_files import write_secret
from appliance.lib.tarpit import Tarpit
from appliance.lib.times import as_utc

KEY_PATTERN = re.compile(r"^apk_(?P<id>[0-9a-f]{20})_(?P<secret>[A-Za-z0-9_-]{43})$")
LAST_USED_EVERY_S = 60.0


class KeyHasher:
    def __init__(self, pepper: bytes) -> None:
        self._pepper = pepper

    @classmethod
    def load_or_create(cls, path: Path) -> KeyHasher:
        if not path.exists():
            try:
                write_secret(path, secrets.token_bytes(32))
            except FileExistsError:
                pass
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (mode 0600)")
        return cls(path.read_bytes())

    def digest(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()


def new_key_material() -> tuple[str, str, str]:
    """(key id, secret, the full key as shown once)."""
    hex_id = secrets.token_hex(10)
    secret = secrets.token_urlsafe(32)
    return f"key_{hex_id}", secret, f"apk_{hex_id}_{secret}"


def key_principal(key: ApiKey) -> Principal:
    roles = {USER} | ({ADMIN} if ADMIN in key.scopes else set())
    return Principal(
        kind="api_key",
        subject=key.id,
        roles=frozenset(roles),
        tenant_id=key.tenant_id,
        workflow_id=key.workflow_id,
        agent_id=key.agent_id,
        api_key_id=key.id,
        scopes=frozenset(key.scopes),
        models=frozenset(key.allowed_models) if key.allowed_models is not None else None,
    )


class ApiKeyAuthenticator:
    """Keys checked against the database once per ``recheck_s`` each (a revoked or expired key stops working in
    every gateway process within that time; expiry itself is checked on every request)."""

    def __init__(
        self,
        engine: Engine,
        hasher: KeyHasher,
        *,
        recheck_s: float = RECHECK_S,
        unknown_per_address: int = 20,
        unknown_window_s: float = 10.0,
        tarpit: Tarpit | None = None,
        networks: ClientNetworks | None = None,
    ) -> None:
        self._engine = engine
        self._hasher = hasher
        self._last_used_written: dict[str, float] = {}
        self._known: Recheck[tuple[str, str], tuple[Principal, datetime | None] | None] = Recheck(
            self._look_up, ttl_s=recheck_s
        )
        # Keys looked up and not found, per client address (and IPv6 network: appliance.lib.addresses): past the
        # limit, a key from that address that was not found valid before is refused without a database read (a flood
        # of made-up keys costs no thread, no query); keys already known valid are still looked up again as usual.
        self._unknown = ClientCounts(unknown_per_address, unknown_window_s, networks)
        self._tarpit = tarpit or Tarpit(0)

    async def authenticate(self, credential: str, address: str | None = None) -> Principal:
        match = KEY_PATTERN.match(credential)
        if match is None:
            raise AuthenticationError()
        key = (f"key_{match['id']}", self._hasher.digest(match["secret"]))
        if address is not None and self._known.kept(key) is None:
            wait = self._unknown.wait(address)
            if wait:
                await self._tarpit.hold()
                raise AuthenticationError(
                    f"Too many unknown credentials from this address; try again in {wait} seconds."
                )
        found = await self._known.get(key)
        if found is None:
            if address is not None:
                self._unknown.add(address)
            raise AuthenticationError()
        principal, expires_at = found
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise AuthenticationError()
        return principal

    def forget(self, key_id: str) -> None:
        """This process revoked ``key_id``: refused from the next request on (other processes: within a second)."""
        self._known.forget_matching(lambda known: known[0] == key_id)

    async def _look_up(self, key: tuple[str, str]) -> tuple[Principal, datetime | None] | None:
        return await asyncio.to_thread(self._check, *key)

    def _check(self, key_id: str, digest: str) -> tuple[Principal, datetime | None] | None:
        """The key's principal and expiry, or None: unknown, wrong secret or revoked."""
        with Session(self._engine) as session:
            key = session.get(ApiKey, key_id)
            # Compare even when the key is unknown, so timing does not tell which ids exist.
            expected = key.secret_hash if key is not None else "0" * 64
            valid = hmac.compare_digest(expected, digest)
            if key is None or not valid or key.revoked_at is not None:
                return None
            expires_at = as_utc(key.expires_at) if key.expires_at is not None else None
            principal = key_principal(key)
            if time.monotonic() - self._last_used_written.get(key_id, -float("inf")) >= LAST_USED_EVERY_S:
                self._last_used_written[key_id] = time.monotonic()
                now = datetime.now(UTC)
                with writing(self._engine) as connection:
                    connection.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))  # type: ignore[arg-type]
            return principal, expires_at

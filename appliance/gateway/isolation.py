"""Tenants' isolation in the engines: each tenant's own prefix cache.

vLLM reuses cached KV blocks of any earlier request with the same prefix, so a tenant could time guesses at
another's prompts. A ``cache_salt`` enters the hash of a request's first block: requests share cached blocks
only when their salts are equal. The gateway sets one on every request it forwards (vLLM 0.32 accepts it on
chat, completions and embeddings; a client's own is refused in :mod:`appliance.gateway.shape`): an HMAC of
the tenant id under a node secret, so one tenant always gets the same salt (its repeated prefixes still hit
the cache, across restarts and gateway processes sharing the data directory), two tenants never one, and no
client can compute another's.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from appliance.lib.secret_files import write_secret

PLATFORM = "platform"  # tenant-less callers (platform admins and operators) share one salt of their own
_KNOWN = 4096  # salts kept made (the cache starts again past it: tenants are few, a node's own records)


class CacheSalts:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the cache salt key must be at least 32 bytes")
        self._key = key
        self._known: dict[str | None, str] = {}  # each tenant's salt, made once (bounded: _KNOWN)

    @classmethod
    def load_or_create(cls, path: Path) -> CacheSalts:
        """The node's key, made on first use (mode 0600); refused when others can read it."""
        if not path.exists():
            try:
                write_secret(path, secrets.token_bytes(32))
            except FileExistsError:
                pass  # another process made it first
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (mode 0600)")
        return cls(path.read_bytes())

    def salt(self, tenant_id: str | None) -> str:
        """64 hex characters (vLLM accepts at most 128, without ``@ / \\`` or NUL)."""
        salt = self._known.get(tenant_id)
        if salt is None:
            subject = f"tenant:{tenant_id}" if tenant_id is not None else PLATFORM
            salt = hmac.new(self._key, subject.encode(), hashlib.sha256).hexdigest()
            if len(self._known) >= _KNOWN:
                self._known.clear()
            self._known[tenant_id] = salt
        return salt

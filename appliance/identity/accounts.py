"""Local accounts of the embedded issuer: argon2id passwords (hashed on their own bounded pool), the bootstrap
admin, sign-in rate limiting."""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from appliance.identity.models import LOCAL_SUBJECT, LocalAccount
from appliance.lib.addresses import ClientCounts, ClientNetworks
from appliance.lib.errors import AuthenticationError
from appliance.lib.principal import ADMIN, Principal
from appliance.lib.recent import RecentCounts
from appliance.lib.secret_files import write_secret
from appliance.lib.tarpit import Tarpit
from appliance.lib.work import WorkPool

T = TypeVar("T")

BOOTSTRAP_USERNAME = "admin"
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def check_password(session: Session, username: str, password: str) -> LocalAccount | None:
    account = session.get(LocalAccount, username)
    try:
        # Verify against a dummy hash for unknown users too: the time taken does not reveal who exists.
        _hasher.verify(account.password_hash if account else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if account is not None and account.disabled:  # told apart from a wrong password by no one
        return None
    return account


def bootstrap_admin(engine: Engine, password_file: Path) -> bool:
    """On first start (no local account yet): create ``admin`` with a random one-time password, written to a
    0600 file for the operator to read. Returns whether it created one."""
    with Session(engine) as session:
        if session.exec(select(func.count()).select_from(LocalAccount)).one() > 0:
            return False
        password = secrets.token_urlsafe(18)
        session.add(
            LocalAccount(
                username=BOOTSTRAP_USERNAME,
                password_hash=hash_password(password),
                roles=[ADMIN],
                must_change_password=True,
            )
        )
        password_file.unlink(missing_ok=True)
        write_secret(password_file, (password + "\n").encode())
        session.commit()
    return True


class LoginLimiter:
    """Limits on sign-in attempts, all checked before a password is hashed (:meth:`admit`):

    - at most ``attempts`` failed sign-ins per (username, client address) in ``window_s`` seconds;
    - at most ``per_address`` attempts per client address in ``address_window_s`` seconds, whatever the
      usernames (a flood with random usernames);
    - at most ``global_rate_per_s`` attempts per second from all addresses together (bursts of
      ``global_burst``).

    And on the token endpoint, where clients sign in with a secret or an authorization code (no hashing there,
    but each attempt costs a database read): at most ``failed_grants`` refused grants per client address in
    ``address_window_s`` seconds, each attempt counted until it succeeds; past that, the address is refused before
    its form is read (:meth:`grant_blocked`), a valid client of that address with it.

    Its memory is bounded: each table keeps at most ``max_entries`` keys, dropping the least recently used.
    """

    def __init__(
        self,
        attempts: int = 5,
        window_s: float = 300.0,
        *,
        per_address: int = 30,
        address_window_s: float = 60.0,
        failed_grants: int = 20,
        global_rate_per_s: float = 10.0,
        global_burst: float = 30.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        tarpit: Tarpit | None = None,
        networks: ClientNetworks | None = None,
    ) -> None:
        self.tarpit = tarpit or Tarpit(0)  # what a refused attempt waits before its answer
        networks = networks or ClientNetworks()  # one, for the failures' keys and the per-address counts
        self._client = networks.keys
        self._rate = global_rate_per_s
        self._burst = global_burst
        self._tokens = global_burst
        self._refilled = clock()
        self._clock = clock
        self._failures: RecentCounts[tuple[str, str]] = RecentCounts(
            attempts, window_s, max_entries=max_entries, clock=clock
        )
        self._by_address = ClientCounts(per_address, address_window_s, networks, max_entries=max_entries, clock=clock)
        self._failed_grants = ClientCounts(
            failed_grants, address_window_s, networks, max_entries=max_entries, clock=clock
        )

    def admit(self, username: str, address: str) -> int:
        """Before hashing: 0 to go ahead (the attempt is counted), else the seconds to wait."""
        wait = self.retry_after(username, address) or self.blocked(address)
        if wait:
            return wait
        self._tokens -= 1
        self._by_address.add(address)
        return 0

    def blocked(self, address: str) -> int:
        """Seconds before any attempt from ``address`` is accepted, whatever its username (0: it may try); the
        sign-in route asks before it even reads the form. Counts nothing."""
        wait = self._by_address.wait(address)
        if wait:
            return wait
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            return max(1, math.ceil((1 - self._tokens) / self._rate))
        return 0

    def retry_after(self, username: str, address: str) -> int:
        """Seconds to wait before another attempt with this username is accepted (0: go ahead)."""
        return self._failures.wait((username, self._client(address)[0]))

    def failed(self, username: str, address: str) -> None:
        self._failures.add((username, self._client(address)[0]))

    def succeeded(self, username: str, address: str) -> None:
        self._failures.forget((username, self._client(address)[0]))

    def grant_blocked(self, address: str) -> int:
        """Seconds before the token endpoint reads a request from ``address`` again (0: it may). Counts nothing."""
        return self._failed_grants.wait(address)

    def grant_attempted(self, address: str) -> None:
        """Counted as refused from the start, before the database is asked: a burst of concurrent requests is held
        at the limit too, not only the requests that come after its refusals (:meth:`grant_succeeded` uncounts)."""
        self._failed_grants.add(address)

    def grant_succeeded(self, address: str) -> None:
        self._failed_grants.take_back(address)

    def entries(self) -> int:
        """Keys held, all tables together (bounded by five times ``max_entries``)."""
        return len(self._failures) + len(self._by_address) + len(self._failed_grants)


class PasswordWork(WorkPool):
    """Password hashing (argon2id: costly in memory and time by design) on its own small pool of threads, so
    sign-ins cannot take the threads that database work runs on; a flood is refused (429), not queued."""

    def __init__(self, workers: int = 2, queue: int = 8) -> None:
        super().__init__(
            "password-hashing",
            workers=workers,
            queue=queue,
            busy="Too many sign-ins at this moment; try again in a few seconds.",
        )


class AccountCheck:
    """An embedded-issuer token of a local account (``sub`` ``local:<username>``) follows its account, like a
    console session: a disabled or deleted account's tokens are refused (401) and a demoted account's carry
    only the roles it still has, within ``recheck_s`` (tokens live ``identity.token_ttl_s``, 10 minutes by
    default). A promotion needs a new token."""

    def __init__(
        self,
        engine: Engine,
        *,
        recheck_s: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._recheck_s = recheck_s
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, tuple[frozenset[str] | None, float]] = OrderedDict()

    async def apply(self, principal: Principal) -> Principal:
        if principal.kind != "token" or not principal.subject.startswith(LOCAL_SUBJECT):
            return principal
        username = principal.subject.removeprefix(LOCAL_SUBJECT)
        seen = self._seen.get(username)
        if seen is None or self._clock() - seen[1] >= self._recheck_s:
            roles = await asyncio.to_thread(self._roles, username)
            self._seen.pop(username, None)
            while len(self._seen) >= self._max_entries:
                self._seen.popitem(last=False)
            seen = self._seen[username] = (roles, self._clock())
        if seen[0] is None:
            raise AuthenticationError()
        return replace(principal, roles=principal.roles & seen[0])

    def _roles(self, username: str) -> frozenset[str] | None:
        with Session(self._engine) as session:
            account = session.get(LocalAccount, username)
            return None if account is None or account.disabled else frozenset(account.roles)

"""Local accounts of the embedded issuer: argon2id passwords, the bootstrap admin, login rate limiting."""

from __future__ import annotations

import secrets
import time
from collections import deque
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from appliance.identity.models import LocalAccount
from appliance.identity.principal import ADMIN
from appliance.identity.signing import write_secret

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
    """At most ``attempts`` failed sign-ins per (username, client address) in ``window_s`` seconds."""

    def __init__(self, attempts: int = 5, window_s: float = 300.0) -> None:
        self._attempts = attempts
        self._window_s = window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def retry_after(self, username: str, address: str) -> int:
        """Seconds to wait before another attempt is accepted (0: go ahead)."""
        failures = self._recent(username, address)
        if len(failures) < self._attempts:
            return 0
        return max(1, int(failures[0] + self._window_s - time.monotonic()) + 1)

    def failed(self, username: str, address: str) -> None:
        self._recent(username, address).append(time.monotonic())

    def succeeded(self, username: str, address: str) -> None:
        self._failures.pop((username, address), None)

    def _recent(self, username: str, address: str) -> deque[float]:
        failures = self._failures.setdefault((username, address), deque())
        while failures and failures[0] < time.monotonic() - self._window_s:
            failures.popleft()
        return failures

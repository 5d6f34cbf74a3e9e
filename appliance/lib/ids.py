"""Identifiers: of stored things, a short type prefix and 80 random bits (``ten_4f0c...``); of requests and
traces, 128 bits that do not read the kernel's random source each time (:func:`unique_hex`)."""

from __future__ import annotations

import hashlib
import itertools
import os
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class _UniqueHex:
    """BLAKE2b keyed with 32 random bytes drawn once per process, over a counter: ids unique within the process
    (distinct inputs), across processes (their keys differ) and unpredictable to whoever sees others (a pseudo-
    random function of a secret key), without reading the kernel's random source for each: ``os.urandom`` gives
    the interpreter lock up, and an event loop that gives it up waits to take it back behind every busy thread
    (the request id's ``uuid4`` was one of the places a watchdog caught the gateway's loop stalled under load).

    The key and its counter are one state, read once per id: two threads drawing the first key at once each use
    their own. A forked child forgets the state (``os.register_at_fork``) and draws its own key."""

    __slots__ = ("_forks_watched", "_state")

    def __init__(self) -> None:
        self._state: tuple[bytes, itertools.count[int]] | None = None
        self._forks_watched = False

    def __call__(self) -> str:
        state = self._state
        if state is None:
            state = self._state = (os.urandom(32), itertools.count())
            if not self._forks_watched:
                self._forks_watched = True
                os.register_at_fork(after_in_child=self._forget)
        key, counter = state
        return hashlib.blake2b(next(counter).to_bytes(8, "big"), key=key, digest_size=16).hexdigest()

    def _forget(self) -> None:
        self._state = None


unique_hex = _UniqueHex()  # 32 hex digits, as uuid4().hex

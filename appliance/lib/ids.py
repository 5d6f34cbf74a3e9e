"""Identifiers: of stored things, a short type prefix and 80 random bits (``ten_4f0c...``); of requests and
traces, 128 bits made without a system call (:func:`unique_hex`)."""

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
    (the request-id's ``uuid4`` was where the gateway's loop stalled most often under load)."""

    __slots__ = ("_counter", "_key", "_pid")

    def __init__(self) -> None:
        self._pid = 0
        self._key = b""
        self._counter = itertools.count()

    def __call__(self) -> str:
        if self._pid != os.getpid():  # drawn on first use, and again in a forked child
            self._pid, self._key, self._counter = os.getpid(), os.urandom(32), itertools.count()
        number = next(self._counter).to_bytes(8, "big")
        return hashlib.blake2b(number, key=self._key, digest_size=16).hexdigest()


unique_hex = _UniqueHex()  # 32 hex digits, as uuid4().hex

"""glibc's allocator, capped to a few arenas for the gateway's processes.

glibc gives threads that contend for its lock arenas of their own, up to eight per core. Memory freed in one arena
is reused only by the threads that land on it, so a process whose pools of threads (database work, password
hashing, document extraction, vector search, the tokenizer's threads) each allocate and free a little at a time
keeps growing: the gateway's resident memory rose by 8-14 % over 15 to 30 minute soaks (bench/soak.py) while the
memory Python itself held (tracemalloc) stayed within a few MiB, and the growth sat in glibc's arenas. With two
arenas, the 30-minute soak's gateway grew by 8.0 % where it had grown by 14.1 %.

``MALLOC_ARENA_MAX`` is glibc's own setting: read when a process starts, so :func:`cap_arenas` both applies it
to this process (``mallopt``, before the process starts its threads) and leaves it in the environment for the
worker processes it starts. A value an operator set is kept.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import MutableMapping
from typing import Any

from appliance.lib.tasks import cancel

log = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


def _glibc(name: str) -> Any | None:
    """The C library's function ``name``, or None where it has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def cap_arenas(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Caps this process's malloc arenas (and its children's, through ``environ``); the cap, or None where the C
    library is not glibc or the value is not a positive number (then nothing is changed)."""
    value = environ.setdefault("MALLOC_ARENA_MAX", str(ARENAS))
    try:
        arenas = int(value)
    except ValueError:
        log.warning("MALLOC_ARENA_MAX=%r is not a number; the allocator keeps its default", value)
        return None
    if arenas < 1:
        return None
    mallopt = _glibc("mallopt")
    if mallopt is None:  # not glibc: the variable is meaningless there, and harmless
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return arenas if mallopt(M_ARENA_MAX, arenas) == 1 else None


def trim() -> bool:
    """Hand the free memory of every glibc arena back to the kernel (``malloc_trim(0)``: free pages inside the
    heaps too, not only at their tops); False where the C library is not glibc."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is None:
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True


class HeapTrimmer:
    """:func:`trim` every ``interval_s`` seconds in a worker thread (0: never). glibc returns freed memory to the
    kernel only from the top of a heap; memory freed below live blocks stays resident until reused, and the
    gateway's many small, short-lived allocations (requests, database rows, vectors) leave such holes."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._interval_s > 0 and _glibc("malloc_trim") is not None:
            self._task = asyncio.create_task(self._run(), name="heap-trim")

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            started = time.monotonic()
            await asyncio.to_thread(trim)
            took = time.monotonic() - started
            # It holds each arena's lock in turn: allocations in other threads wait meanwhile.
            (log.warning if took > 0.1 else log.debug)("malloc_trim took %.1f ms", took * 1000)

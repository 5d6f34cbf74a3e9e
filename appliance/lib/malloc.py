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

import ctypes
import logging
import os
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


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
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: the variable is meaningless there, and harmless
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return arenas if mallopt(M_ARENA_MAX, arenas) == 1 else None

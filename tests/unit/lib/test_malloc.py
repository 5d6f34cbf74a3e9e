"""glibc's arenas capped for the gateway's processes (appliance.lib.malloc).

The arenas are counted with glibc's own ``malloc_info`` in a fresh interpreter, once with the cap and once without,
while eight threads each hold a block they allocated: without the cap each thread gets an arena of its own."""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import sys
import textwrap
import time
from unittest import mock

import pytest

from appliance.lib.malloc import ARENAS, HeapTrimmer, cap_arenas

pytestmark = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "malloc_info"), reason="the C library is not glibc")

COUNT_ARENAS = textwrap.dedent(
    """
    import ctypes, os, re, sys, tempfile, threading
    from appliance.lib.malloc import cap_arenas

    environ = {} if sys.argv[1] == "cap" else {"MALLOC_ARENA_MAX": "0"}
    cap_arenas(environ)
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    barrier = threading.Barrier(9)

    def hold():
        libc.malloc(4096)  # a thread's first block: glibc picks its arena now
        barrier.wait()  # every thread holds its block and its arena at once
        barrier.wait()

    threads = [threading.Thread(target=hold) for _ in range(8)]
    for thread in threads:
        thread.start()
    barrier.wait()
    handle, path = tempfile.mkstemp()
    os.close(handle)
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    barrier.wait()
    for thread in threads:
        thread.join()
    print(len(re.findall(r"<heap nr=", open(path).read())))
    os.unlink(path)
    """
)


def arenas_with(mode: str) -> int:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", COUNT_ARENAS, mode], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.strip())


def test_the_cap_keeps_eight_busy_threads_on_two_arenas_where_they_would_each_get_one() -> None:
    assert arenas_with("cap") <= ARENAS
    assert arenas_with("default") > ARENAS  # the count sees arenas: without the cap the threads spread


def test_the_cap_is_left_to_the_worker_processes_and_an_operators_value_is_kept() -> None:
    environ: dict[str, str] = {}
    assert cap_arenas(environ) == ARENAS
    assert environ == {"MALLOC_ARENA_MAX": str(ARENAS)}

    environ = {"MALLOC_ARENA_MAX": "4"}
    assert cap_arenas(environ) == 4
    assert environ == {"MALLOC_ARENA_MAX": "4"}


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_value_that_is_no_cap_changes_nothing(value: str) -> None:
    environ = {"MALLOC_ARENA_MAX": value}
    assert cap_arenas(environ) is None
    assert environ == {"MALLOC_ARENA_MAX": value}


HOLES = textwrap.dedent(
    """
    import ctypes, os, sys
    from appliance.lib.malloc import trim

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * page / 2**20

    blocks = [libc.malloc(2048) for _ in range(40_000)]  # 80 MiB of small blocks, below mmap's threshold
    for block in blocks:
        libc.memset(block, 1, 2048)
    keep = libc.malloc(2048)  # a live block above them: the heap's top cannot shrink
    for block in blocks:
        libc.free(block)
    freed = resident_mib()
    trimmed = trim()
    print(freed, resident_mib(), trimmed)
    """
)


def test_trim_hands_back_memory_freed_below_a_live_block() -> None:
    """Freed below a block still in use, 80 MiB stays resident; :func:`trim` gives it back to the kernel."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", HOLES], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    freed, after, trimmed = done.stdout.split()
    assert trimmed == "True"
    assert float(freed) - float(after) >= 60, done.stdout  # most of the 80 MiB


async def test_the_trimmer_trims_every_interval_and_stops() -> None:
    trimmer = HeapTrimmer(0.05)
    calls: list[float] = []
    with mock.patch("appliance.lib.malloc.trim", side_effect=lambda: calls.append(time.monotonic()) or True):
        await trimmer.start()
        await asyncio.sleep(0.3)
        await trimmer.stop()
        await asyncio.sleep(0.05)  # a trim already in its thread when stopped ends there
        count = len(calls)
        await asyncio.sleep(0.15)
    assert count >= 3 and len(calls) == count  # one each interval, none once stopped
    never = HeapTrimmer(0)
    await never.start()
    await never.stop()

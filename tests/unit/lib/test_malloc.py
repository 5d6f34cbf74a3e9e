"""glibc's arenas capped for the gateway's processes (appliance.lib.malloc).

The arenas are counted with glibc's own ``malloc_info`` in a fresh interpreter, once with the cap and once without,
while eight threads each hold a block they allocated: without the cap each thread gets an arena of its own."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from appliance.lib.malloc import ARENAS, cap_arenas

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

"""Bounded pools of worker threads, one per kind of heavy work, so that no one kind can take the threads another
needs: password hashing and document extraction each run on a small pool of their own, and database work on the
event loop's default pool, which nothing heavy uses. At most ``workers`` run and ``queue`` wait; more are refused
at once (429 with ``Retry-After``) rather than queued without bound. The threads start with the first job.

A pool of background work (document extraction) runs its threads at a lower scheduling priority (``nice``): on a
busy node the kernel gives the CPU to the event loop's thread first, so answers are not slowed by work that can
wait. Linux keeps a nice value per thread; where it cannot be raised, the pool runs at the process's priority."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from appliance.lib.errors import RateLimitedError

T = TypeVar("T")

log = logging.getLogger(__name__)


def lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value by ``nice`` (this thread only, on Linux)."""
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as exc:
        log.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)


class WorkPool:
    def __init__(
        self, name: str, *, workers: int, queue: int, busy: str, retry_after_s: int = 2, nice: int = 0
    ) -> None:
        self.name = name
        self._nice = nice
        self._workers = workers
        self._capacity = workers + queue
        self._busy = busy  # the refusal's message
        self._retry_after_s = retry_after_s
        self._in_flight = 0
        self._executor: ThreadPoolExecutor | None = None

    @property
    def full(self) -> bool:
        return self._in_flight >= self._capacity

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        if self.full:
            raise RateLimitedError(self._busy, retry_after=self._retry_after_s)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._workers,
                thread_name_prefix=self.name,
                initializer=functools.partial(lower_thread_priority, self._nice) if self._nice else None,
            )
        self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))
        finally:
            self._in_flight -= 1

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

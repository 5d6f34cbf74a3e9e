"""Bounded pools of worker threads, one per kind of heavy work, so that no one kind can take the threads another
needs: password hashing and document extraction each run on a small pool of their own, and database work on the
event loop's default pool, which nothing heavy uses. At most ``workers`` run and ``queue`` wait; more are refused
at once (429 with ``Retry-After``) rather than queued without bound. The threads start with the first job."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from appliance.lib.errors import RateLimitedError

T = TypeVar("T")


class WorkPool:
    def __init__(self, name: str, *, workers: int, queue: int, busy: str, retry_after_s: int = 2) -> None:
        self.name = name
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
            self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self.name)
        self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))
        finally:
            self._in_flight -= 1

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

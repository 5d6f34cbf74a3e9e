"""Facts the hot path asks for on every request, answered from memory and looked up again after a short time.

A :class:`Recheck` keeps each answer of its lookup for ``ttl_s`` seconds, then asks the lookup again, so a change
made in the database (a key revoked, a tenant deleted, a budget added, content capture switched on) takes
effect in every gateway process within ``ttl_s``. One lookup per key is in flight at a time (a burst of requests
for one key waits for one database read, not one each). A lookup that raises is not kept: the next request
asks again, so a database that is down fails closed on every request rather than serving a stale answer for
ever; an answer already kept is still served until it is ``ttl_s`` old.

Refreshed ahead: an answer older than ``refresh_s`` (half of ``ttl_s`` unless said) but younger than ``ttl_s`` is
still served from memory, and the first request to find it so starts one lookup in the background. Under load
no request waits for the database (every request arriving during a lookup used to), and no answer served is
older than ``ttl_s``, as before. A refresh that fails (the database down, or a lookup that refuses) drops the
answer: the next request waits for a lookup of its own, and fails closed with it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

RECHECK_S = 1.0  # how stale a fact the hot path answers from memory may be


class Recheck(Generic[K, V]):
    __slots__ = ("_clock", "_entries", "_inflight", "_lookup", "_max_entries", "_refresh_s", "_refreshing", "_ttl_s")

    def __init__(
        self,
        lookup: Callable[[K], Awaitable[V]],
        *,
        ttl_s: float = RECHECK_S,
        refresh_s: float | None = None,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._refresh_s = ttl_s / 2 if refresh_s is None else refresh_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}  # key -> (when it was looked up, the answer)
        self._inflight: dict[K, asyncio.Future[V]] = {}
        self._refreshing: set[asyncio.Task[V]] = set()  # background refreshes (held: the loop keeps weak refs)

    async def get(self, key: K) -> V:
        while True:
            entry = self._entries.get(key)
            if entry is not None:
                age = self._clock() - entry[0]
                if age < self._refresh_s:
                    return entry[1]
                if age < self._ttl_s:
                    if key not in self._inflight:
                        self._refresh(key)
                    return entry[1]
            pending = self._inflight.get(key)
            if pending is None:
                return await self._look_up(key)
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not pending.cancelled() or (current is not None and current.cancelling()):
                    raise
                # The request that was looking it up left; this one asks again.

    def _refresh(self, key: K) -> None:
        """Look ``key`` up again in the background (registered as in flight at once, so once only)."""
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        task = asyncio.ensure_future(self._look_up(key, future))
        self._refreshing.add(task)
        task.add_done_callback(lambda done: self._refreshed(done, key, future))

    def _refreshed(self, task: asyncio.Task[V], key: K, future: asyncio.Future[V]) -> None:
        self._refreshing.discard(task)
        if task.cancelled():  # cancelled before it ran (the loop closing): nobody may wait for it for ever
            if self._inflight.get(key) is future:
                del self._inflight[key]
            future.cancel()
        else:
            task.exception()  # a failed refresh is retried by a later request; nobody waits for this one

    async def _look_up(self, key: K, future: asyncio.Future[V] | None = None) -> V:
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._inflight[key] = future
        looked_up_at = self._clock()
        try:
            value = await self._lookup(key)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            if self._inflight.get(key) is future:  # a refresh that fails leaves no stale answer: fail closed
                self._entries.pop(key, None)
            future.set_exception(exc)
            future.exception()  # the waiters re-raise it; nobody else need retrieve it
            raise
        else:
            future.set_result(value)
            if self._inflight.get(key) is future:  # not forgotten meanwhile: a revocation is not undone
                self._entries.pop(key, None)
                while len(self._entries) >= self._max_entries:
                    self._entries.pop(next(iter(self._entries)))  # the oldest inserted goes first
                self._entries[key] = (looked_up_at, value)
            return value
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def kept(self, key: K) -> V | None:
        """The answer kept for ``key``, fresh or not (None: none is kept)."""
        entry = self._entries.get(key)
        return entry[1] if entry is not None else None

    def forget(self, key: K) -> None:
        """Drop what is kept for ``key`` (this process changed it and knows the answer is stale). A lookup in
        flight for it still answers those waiting on it, but its answer, perhaps read before the change, is not
        kept."""
        self._entries.pop(key, None)
        self._inflight.pop(key, None)

    def forget_matching(self, matches: Callable[[K], bool]) -> None:
        for key in [key for key in [*self._entries, *self._inflight] if matches(key)]:
            self.forget(key)

    def clear(self) -> None:
        self._entries.clear()
        self._inflight.clear()

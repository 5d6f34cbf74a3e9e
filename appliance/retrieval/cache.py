"""Results of repeated queries, kept per collection *version*: any change of a collection bumps its version in
the database, so a stale entry can never be served, in this process or another."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")
CacheKey = tuple[str, int, int, str]  # collection id, version, top_k, query


class RetrievalCache(Generic[V]):
    def __init__(self, entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries, self._ttl_s, self._clock = entries, ttl_s, clock
        self._items: OrderedDict[CacheKey, tuple[float, V]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: CacheKey) -> V | None:
        item = self._items.get(key)
        if item is None or self._clock() - item[0] > self._ttl_s:
            if item is not None:
                del self._items[key]
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: CacheKey, value: V) -> None:
        if self._entries == 0:
            return
        self._items[key] = (self._clock(), value)
        self._items.move_to_end(key)
        while len(self._items) > self._entries:
            self._items.popitem(last=False)

    def forget(self, collection_id: str) -> None:
        """Drop a collection's entries now (its newer version would miss them anyway; this frees the memory)."""
        for key in [key for key in self._items if key[0] == collection_id]:
            del self._items[key]

"""How often each key (a client address, a username) was seen lately, in bounded memory: the sliding windows of
the appliance's limits on refusals (sign-in attempts, unknown credentials)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class RecentCounts(Generic[K]):
    """At most ``limit`` events per key in any ``window_s`` seconds. Keeps at most ``max_entries`` keys, dropping
    the least recently seen: a flood of new keys costs a bounded table, and forgets only the oldest keys."""

    def __init__(
        self, limit: int, window_s: float, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._times: OrderedDict[K, deque[float]] = OrderedDict()

    def wait(self, key: K) -> int:
        """Whole seconds before ``key`` is under its limit again (0: it is). Counts nothing."""
        times = self._recent(key)
        if times is None or len(times) < self.limit:
            return 0
        return max(1, int(times[0] + self.window_s - self._clock()) + 1)

    def add(self, key: K) -> None:
        """Count one event of ``key`` now."""
        times = self._recent(key)
        if times is None:
            while len(self._times) >= self._max_entries:
                self._times.popitem(last=False)
            times = self._times[key] = deque(maxlen=self.limit)
        else:
            self._times.move_to_end(key)
        times.append(self._clock())

    def forget(self, key: K) -> None:
        self._times.pop(key, None)

    def take_back(self, key: K) -> None:
        """Uncount ``key``'s latest event (one counted before its outcome was known, which turned out well)."""
        times = self._times.get(key)
        if times:
            times.pop()

    def __len__(self) -> int:
        return len(self._times)

    def _recent(self, key: K) -> deque[float] | None:
        """The key's times within the window (None: none; an emptied key is dropped). Never adds a key."""
        times = self._times.get(key)
        if times is None:
            return None
        cutoff = self._clock() - self.window_s
        while times and times[0] < cutoff:
            times.popleft()
        if not times:
            del self._times[key]
            return None
        return times

from __future__ import annotations

from appliance.retrieval.cache import RetrievalCache


def test_entries_expire_are_evicted_and_are_keyed_by_version() -> None:
    now = [0.0]
    cache: RetrievalCache[str] = RetrievalCache(entries=2, ttl_s=10, clock=lambda: now[0])
    cache.put(("c1", 1, 4, "q"), "v1")
    assert cache.get(("c1", 1, 4, "q")) == "v1"
    assert cache.get(("c1", 2, 4, "q")) is None, "a newer collection version misses"
    cache.put(("c2", 1, 4, "q"), "x")
    cache.get(("c1", 1, 4, "q"))
    cache.put(("c3", 1, 4, "q"), "y")  # evicts the least recently used: c2
    assert cache.get(("c2", 1, 4, "q")) is None and cache.get(("c1", 1, 4, "q")) == "v1"
    now[0] = 11
    assert cache.get(("c1", 1, 4, "q")) is None
    cache.put(("c1", 1, 4, "q"), "v1")
    cache.forget("c1")
    assert cache.get(("c1", 1, 4, "q")) is None
    assert (cache.hits, cache.misses) == (3, 4)


def test_a_cache_of_no_entries_keeps_nothing() -> None:
    cache: RetrievalCache[str] = RetrievalCache(entries=0, ttl_s=10)
    cache.put(("c", 1, 1, "q"), "v")
    assert cache.get(("c", 1, 1, "q")) is None

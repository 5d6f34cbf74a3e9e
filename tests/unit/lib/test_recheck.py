"""Facts answered from memory (appliance/lib/recheck.py): one lookup at a time, an answer past its refresh age
served while one background lookup refreshes it, a refresh that fails leaving nothing behind, and no answer older
than ttl_s ever served."""

from __future__ import annotations

import asyncio

import pytest

from appliance.lib.recheck import Recheck


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """The database the facts come from: answers after ``delay_s``, counting lookups."""

    def __init__(self) -> None:
        self.value = "v1"
        self.lookups = 0
        self.delay_s = 0.05
        self.fail = False

    async def __call__(self, key: str) -> str:
        self.lookups += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the database is down")
        return f"{key}:{self.value}"


async def test_a_burst_for_one_key_makes_one_lookup_and_fresh_answers_come_from_memory() -> None:
    source, clock = Source(), Clock()
    facts = Recheck(source, ttl_s=1.0, clock=clock)
    assert await asyncio.gather(*(facts.get("k") for _ in range(50))) == ["k:v1"] * 50
    assert source.lookups == 1
    clock.now += 0.4
    assert await facts.get("k") == "k:v1" and source.lookups == 1


async def test_a_stale_answer_is_served_at_once_while_one_lookup_refreshes_it() -> None:
    source, clock = Source(), Clock()
    facts = Recheck(source, ttl_s=1.0, refresh_s=0.5, clock=clock)
    await facts.get("k")
    source.value = "v2"
    clock.now += 0.7  # to be refreshed, not old
    loop = asyncio.get_running_loop()
    started = loop.time()
    answers = [await facts.get("k") for _ in range(20)]
    assert answers == ["k:v1"] * 20 and loop.time() - started < source.delay_s, "nobody waited for the lookup"
    await asyncio.sleep(source.delay_s * 3)
    assert source.lookups == 2, "one background refresh"
    assert await facts.get("k") == "k:v2" and source.lookups == 2


async def test_an_old_answer_is_never_served() -> None:
    source, clock = Source(), Clock()
    facts = Recheck(source, ttl_s=1.0, refresh_s=0.5, clock=clock)
    await facts.get("k")
    source.value = "v2"
    clock.now += 1.0  # as old as ttl_s: never served; the request waits for the lookup
    assert await facts.get("k") == "k:v2"


async def test_a_refresh_that_fails_leaves_nothing_stale_behind() -> None:
    source, clock = Source(), Clock()
    facts = Recheck(source, ttl_s=1.0, refresh_s=0.5, clock=clock)
    await facts.get("k")
    source.fail = True
    clock.now += 0.7
    assert await facts.get("k") == "k:v1"  # served while the refresh runs
    await asyncio.sleep(source.delay_s * 3)  # the refresh failed
    with pytest.raises(RuntimeError):
        await facts.get("k")  # no stale answer left: this request looks up itself, and fails closed


async def test_an_answer_used_lately_is_kept_fresh_in_the_background_then_left_to_go_stale() -> None:
    """A client that calls less often than ttl_s finds its answer fresh (no wait for the database); one that
    stopped calling costs no lookups once keep_warm_s has passed; close() stops it at once."""
    source = Source()
    source.delay_s = 0.02
    recheck: Recheck[str, str] = Recheck(source, ttl_s=0.2, keep_warm_s=0.6)
    assert await recheck.get("k") == "k:v1"
    source.value = "v2"  # changed in the database while the client is quiet
    await asyncio.sleep(0.45)  # past ttl_s: without keeping warm, the next get would wait for a lookup
    assert source.lookups >= 3
    started = asyncio.get_running_loop().time()
    assert await recheck.get("k") == "k:v2"
    assert asyncio.get_running_loop().time() - started < source.delay_s, "the request waited for the database"
    await asyncio.sleep(0.9)  # unused for longer than keep_warm_s
    quiet = source.lookups
    await asyncio.sleep(0.4)
    assert source.lookups == quiet, "an answer nobody asked for lately was still looked up"

    await recheck.get("k")
    await asyncio.sleep(0.25)
    recheck.close()
    await asyncio.sleep(0.05)  # a refresh already under way finishes
    closed = source.lookups
    await asyncio.sleep(0.4)
    assert source.lookups == closed


async def test_answers_refused_for_warmth_are_never_looked_up_unasked() -> None:
    """Not-found answers (a flood of made-up keys) and failed lookups are not kept warm."""
    source = Source()
    source.delay_s = 0.0
    recheck: Recheck[str, str] = Recheck(source, ttl_s=0.1, keep_warm_s=5.0, warm=lambda value: "made-up" not in value)
    for n in range(50):
        await recheck.get(f"made-up-{n}")
    source.fail = True
    with pytest.raises(RuntimeError):
        await recheck.get("failing")
    asked = source.lookups
    await asyncio.sleep(0.35)
    assert source.lookups == asked

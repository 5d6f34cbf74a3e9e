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


async def test_a_lookup_in_flight_when_the_answer_is_forgotten_is_not_kept() -> None:
    """A key revoked in this process while its lookup (begun before) is in flight: the lookup's answer, read
    before the revocation, must not be put back; the next request looks up again."""
    database = {"k": "valid"}
    lookups = 0

    async def read_then_wait(key: str) -> str:  # the read happens first; the answer lands later
        nonlocal lookups
        lookups += 1
        value = database[key]
        await asyncio.sleep(0.1)
        return value

    recheck: Recheck[str, str] = Recheck(read_then_wait, ttl_s=10.0)
    looking = asyncio.ensure_future(recheck.get("k"))
    await asyncio.sleep(0.02)
    database["k"] = "revoked"
    recheck.forget("k")
    assert await looking == "valid"  # the request that asked before the change gets what was read then
    assert await recheck.get("k") == "revoked"
    assert lookups == 2

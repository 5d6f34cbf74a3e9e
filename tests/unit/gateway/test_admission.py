"""Admission tiers: concurrency limits, order, priority, queue timeouts, and nothing leaked on cancellation."""

from __future__ import annotations

import asyncio

import pytest

from appliance.gateway.admission import LONG, SHORT, Admission, QueueTimeoutError, Tier
from appliance.settings import AdmissionSettings


async def test_a_tier_admits_up_to_its_limit_then_queues_in_order() -> None:
    tier = Tier("long", limit=1, timeout_s=5)
    await tier.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        await tier.acquire()
        order.append(n)

    waiters = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert (tier.in_flight, tier.waiting, order) == (1, 3, [])
    for _ in range(3):
        tier.release()
        await asyncio.sleep(0.01)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2] and tier.in_flight == 1
    tier.release()
    assert tier.in_flight == 0


async def test_priority_scopes_go_first_within_a_tier() -> None:
    admission = Admission(AdmissionSettings(long_concurrency=1, priority_scopes=["wf_vip"]))
    first = await admission.admit("m", prompt_tokens=4000)
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        ticket = await admission.admit("m", 4000, priority)
        order.append(name)
        ticket.release()

    plain = asyncio.create_task(wait("plain", admission.priority("ten_1", "wf_1")))
    await asyncio.sleep(0.01)
    vip = asyncio.create_task(wait("vip", admission.priority("ten_1", "wf_vip")))
    await asyncio.sleep(0.01)
    first.release()
    await asyncio.gather(plain, vip)
    assert order == ["vip", "plain"]


async def test_a_request_that_waits_past_the_timeout_gets_503_with_retry_after() -> None:
    tier = Tier("short", limit=1, timeout_s=0.05)
    await tier.acquire()
    with pytest.raises(QueueTimeoutError) as refused:
        await tier.acquire()
    assert refused.value.status_code == 503 and refused.value.code == "admission_timeout"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert refused.value.headers["x-should-retry"] == "true"  # the openai SDK retries it, after Retry-After
    assert (tier.in_flight, tier.waiting, tier.timed_out) == (1, 0, 1)
    tier.release()
    await tier.acquire()  # the slot is free again: nothing leaked
    assert tier.in_flight == 1


async def test_a_cancelled_waiter_does_not_leak_its_slot() -> None:
    tier = Tier("short", limit=1, timeout_s=5)
    await tier.acquire()
    waiting = asyncio.create_task(tier.acquire())
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.sleep(0.01)
    tier.release()
    assert (tier.in_flight, tier.waiting) == (0, 0)


async def test_tiers_are_chosen_by_the_real_prompt_length_and_kept_apart() -> None:
    admission = Admission(AdmissionSettings(long_prompt_tokens=512, long_concurrency=1, short_concurrency=2))
    assert (admission.tier_of(511), admission.tier_of(512)) == (SHORT, LONG)
    await admission.admit("m", 4000)
    shorts = [await admission.admit("m", 10) for _ in range(2)]  # a busy long tier does not hold short ones
    snapshot = admission.snapshot()["m"]
    assert (snapshot[LONG]["in_flight"], snapshot[SHORT]["in_flight"]) == (1, 2)
    for ticket in shorts:
        ticket.release()
        ticket.release()  # releasing twice frees one slot
    assert admission.snapshot()["m"][SHORT]["in_flight"] == 0


@pytest.mark.parametrize("until_first_token", [True, False])
async def test_a_streamed_request_gives_its_slot_back_at_its_first_token(until_first_token: bool) -> None:
    from appliance.gateway.settlement import Settlement, Source
    from appliance.ledger.writer import UsageWriter

    admission = Admission(AdmissionSettings(long_concurrency=1, slot_until_first_token=until_first_token))
    ticket = await admission.admit("engine", 10_000)
    writer = UsageWriter(None, capacity=1)  # type: ignore[arg-type]  # never started: only a slot is taken
    settlement = Settlement(await writer.acquire(), None, Source(), None)
    settlement.admitted(ticket)
    settlement.first_token()
    tier = admission.tiers("engine")[LONG]
    assert tier.in_flight == (0 if until_first_token else 1)
    ticket.release()  # when the request ends: never twice
    assert tier.in_flight == 0

"""Budgets enforced from leases held in memory: exact across processes, bounded in what they cost precision,
given back when idle, at a window's end and at shutdown, and charged in full when their process dies."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from appliance.budgets.leases import BudgetLeases
from appliance.budgets.store import BudgetExceededError, BudgetStore, GatewaySweptError
from tests.unit.budgets.conftest import CHAIN, Clock, add_budget

ZONE = ZoneInfo("Europe/Paris")


def process(store: BudgetStore, name: str, clock: Clock, **options: Any) -> BudgetLeases:
    """One gateway process: its own store (its own gateway id, registered alive) and leases."""
    own = BudgetStore(store._engine, ZONE, clock, gateway_id=f"gw_{name}")
    own.register("test", 0)
    return BudgetLeases(own, ZONE, clock=clock, **options)


def counters(store: BudgetStore) -> tuple[int, int]:
    with store._engine.connect() as connection:
        used, reserved = connection.execute(
            text("SELECT coalesce(sum(used), 0), coalesce(sum(reserved), 0) FROM budget_counters")
        ).one()
    return int(used), int(reserved)


async def test_a_lease_serves_requests_from_memory_and_commits_what_they_spent(
    store: BudgetStore, clock: Clock
) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 10_000)
    leases = process(store, "a", clock, lease_fraction=0.1)
    grants = []
    for n in range(5):
        hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=40)
        assert hold is not None and hold.grant.max_tokens == 40 and not hold.grant.clamped
        hold.settle(10 + n, 0, reached_engine=True)
        await hold.durable()
        grants.append(hold)
    assert counters(store)[0] == sum(10 + n for n in range(5)), "what was spent is committed as used"
    [row] = store.status()
    assert row["leased"] > 0 and row["reserved"] == 0, "the rest of the slice is leased, not reserved by a request"
    assert row["remaining"] == 10_000 - row["used"], "a leased slice is still spendable"
    assert await leases.stop()
    assert counters(store) == (60, 0) and store.dangling() == 0, "stopping gave the slice back"


async def test_spending_is_gathered_for_a_commit_until_someone_waits_for_it(store: BudgetStore, clock: Clock) -> None:
    """Commits gather what settles for ``commit_interval_s``; a reader that needs them (``GET /admin/budgets/``
    waits for this process's commit) does not wait out the gathering."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 10_000)
    leases = process(store, "a", clock, lease_fraction=0.1, commit_interval_s=5.0)
    await leases.start()
    try:
        hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=40)
        assert hold is not None
        hold.settle(25, 0, reached_engine=True)
        await asyncio.sleep(0.2)  # the commit loop is gathering now
        assert counters(store)[0] == 0, "not committed yet: gathered"
        loop = asyncio.get_running_loop()
        started = loop.time()
        await leases.committed()
        assert loop.time() - started < 2.0, "the reader cut the gathering short"
        assert counters(store)[0] == 25
    finally:
        assert await leases.stop()


async def test_two_processes_together_never_spend_more_than_the_limit(store: BudgetStore, clock: Clock) -> None:
    """Many concurrent requests in two processes, each spending a random share of what it reserved: the sum of
    what both committed never exceeds the limit, every call is counted once, and nothing stays held."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 3_000)
    add_budget(store, "tenant", "ten_1", "requests", "day", 120)
    processes = [process(store, name, clock, lease_fraction=0.05) for name in ("a", "b")]
    for leases in processes:
        await leases.start()
    rng = random.Random(3)
    spent = refused = 0

    async def request(leases: BudgetLeases) -> None:
        nonlocal spent, refused
        try:
            hold = await leases.reserve(CHAIN, prompt_tokens=20, max_tokens=60)
        except BudgetExceededError:
            refused += 1
            return
        assert hold is not None
        await asyncio.sleep(rng.random() / 100)
        used = 20 + rng.randint(0, hold.grant.max_tokens or 0)
        hold.settle(used, 0, reached_engine=True)
        spent += used
        await hold.durable()

    await asyncio.gather(*(request(processes[n % 2]) for n in range(300)))
    for leases in processes:
        assert await leases.stop()
    used, reserved = counters(store)
    tokens_used = next(row["used"] for row in store.status() if row["kind"] == "tokens")
    calls_used = next(row["used"] for row in store.status() if row["kind"] == "requests")
    assert tokens_used == spent <= 3_000 and calls_used == 300 - refused <= 120
    assert refused > 0 and reserved == 0 and store.dangling() == 0
    assert used == tokens_used + calls_used


async def test_what_a_slice_held_elsewhere_costs_is_bounded(store: BudgetStore, clock: Clock) -> None:
    """Process a holds a slice it does not use; process b can still spend all the rest: the budget loses at most
    a's unused slice (lease_fraction x limit beyond a's own need)."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    a, b = process(store, "a", clock, lease_fraction=0.1), process(store, "b", clock, lease_fraction=0.1)
    first = await a.reserve(CHAIN, prompt_tokens=5, max_tokens=5)
    assert first is not None
    first.settle(10, 0, reached_engine=True)
    await first.durable()
    held_by_a = next(iter(a._leases.values())).free
    assert 0 < held_by_a <= 100, "need plus at most 10 % of the limit"
    spent_by_b = 0
    with pytest.raises(BudgetExceededError):
        while True:
            hold = await b.reserve(CHAIN, prompt_tokens=5, max_tokens=5)
            assert hold is not None
            hold.settle(10, 0, reached_engine=True)
            spent_by_b += 10
    assert spent_by_b >= 1_000 - 10 - held_by_a - 10, "b was refused only what a holds (and the last odd tokens)"
    assert spent_by_b + 10 <= 1_000


async def test_an_idle_lease_is_given_back(store: BudgetStore, clock: Clock) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    leases = process(store, "a", clock, lease_fraction=0.2, idle_s=0.05)
    await leases.start()
    hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    assert hold is not None
    hold.settle(15, 0, reached_engine=True)
    await hold.durable()
    assert counters(store)[1] > 0, "the slice is held while it may be used"
    for _ in range(60):
        await asyncio.sleep(0.05)
        leases.changed()
        if counters(store) == (15, 0):
            break
    assert counters(store) == (15, 0) and store.dangling() == 0
    await leases.stop()


async def test_a_lease_ends_with_its_window(store: BudgetStore, clock: Clock) -> None:
    """A budget's window turns over: requests draw on a lease of the new window, the old one is given back."""
    add_budget(store, "workflow", "wf_1", "tokens", "hour", 100)
    leases = process(store, "a", clock, lease_fraction=0.5)
    hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=80)
    assert hold is not None and hold.grant.max_tokens == 80
    hold.settle(90, 0, reached_engine=True)
    await hold.durable()
    with pytest.raises(BudgetExceededError):
        await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    clock.moment += timedelta(hours=1)
    again = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=80)
    assert again is not None and again.grant.max_tokens == 80, "a new hour, a new lease"
    again.settle(20, 0, reached_engine=True)
    await again.durable()
    assert await leases.stop()
    assert store.dangling() == 0 and counters(store) == (110, 0)


async def test_a_dead_process_lease_is_charged_in_full_by_the_sweep(store: BudgetStore, clock: Clock) -> None:
    """kill -9: what its last requests spent may not be committed, so its leases are charged whole (a budget is
    an upper bound); the live process's lease is untouched."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    dead, alive = process(store, "dead", clock, lease_fraction=0.1), process(store, "alive", clock, lease_fraction=0.1)
    for leases in (dead, alive):
        hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
        assert hold is not None
        hold.settle(20, 0, reached_engine=True)
        await hold.durable()
    dead_slice = next(iter(dead._leases.values())).granted
    alive_slice = next(iter(alive._leases.values())).granted
    dead.store.deregister("gw_dead")  # its heartbeat stopped: the sweep takes it for gone
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 1
    assert counters(store) == (40 + dead_slice, alive_slice), "the dead slice charged, the live one held"
    assert await alive.stop()
    assert counters(store) == (40 + dead_slice, 0)


async def test_a_live_process_swept_as_dead_is_charged_what_it_spent_once(store: BudgetStore, clock: Clock) -> None:
    """A process alive but silent past ``gateway_dead_after_s`` (a database outage, a stalled host) is swept: its
    leases are charged in full. What it spent from them, committed after the sweep or settled by requests still in
    flight, is covered by that charge, and what the charge covered beyond its spending goes back once no request of
    the lease is in flight: the books end exact. A refill never brings a swept lease back under its old id."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    slow = process(store, "slow", clock, lease_fraction=0.1)
    first = await slow.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    assert first is not None
    first.settle(20, 0, reached_engine=True)
    await first.durable()
    in_flight = await slow.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    settled = await slow.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    assert in_flight is not None and settled is not None
    settled.settle(30, 0, reached_engine=True)  # spent, not yet committed
    used, swept_slice = counters(store)
    assert used == 20 and swept_slice > 0
    slow.store.deregister("gw_slow")  # silent too long: the sweep takes it for dead
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 1
    assert counters(store) == (20 + swept_slice, 0), "its slice charged in full"

    with pytest.raises(GatewaySweptError):  # a refill before it knows: refused, not a swept row brought back
        await slow.reserve(CHAIN, prompt_tokens=10, max_tokens=500)
    await slow.committed()
    assert counters(store) == (20 + swept_slice, 0), "its 30 committed after the sweep: in what the sweep charged"

    [swept] = [*slow._leases.values(), *slow._retired]
    slow.store.register("test", 0)  # its heartbeat found its row gone: it registers again
    with pytest.raises(GatewaySweptError):  # a refill of the swept lease that reaches the database only now
        slow.store.grant(swept.id, swept.budget["id"], swept.start, need=10, least=10, extra=0, registration=1)
    in_flight.settle(15, 0, reached_engine=True)
    fresh = await slow.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    assert fresh is not None and fresh.draws[0][0].id == swept.id + ":2", "leased afresh under a new id"
    fresh.settle(25, 0, reached_engine=True)
    await fresh.durable()
    assert counters(store)[0] == 20 + 30 + 15 + 25, "each request charged once; the swept slice's rest went back"
    assert await slow.stop()
    assert counters(store) == (20 + 30 + 15 + 25, 0) and store.dangling() == 0


@pytest.mark.parametrize("swept", [False, True], ids=["alive", "swept after"])
async def test_spending_past_a_lease_whose_row_its_own_commit_emptied_is_charged(
    store: BudgetStore, clock: Clock, swept: bool
) -> None:
    """Requests may spend past their hold (the engine's count is charged): a commit can take a lease's row to 0,
    which deletes it. Requests still in flight then settle into a lease without a row, and what they spend is
    charged all the same, in later commits, whether or not a sweep took the process for dead meanwhile (it charged
    nothing for the lease: there was no row, so there is no credit to draw on)."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    leases = process(store, "a", clock, lease_fraction=0.0)  # no slice beyond what requests hold
    a = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=50)
    b = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=30)
    c = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=30)
    assert a is not None and b is not None and c is not None and counters(store) == (0, 140)
    a.settle(140, 0, reached_engine=True)  # 80 past its hold of 60
    await a.durable()
    assert counters(store) == (140, 0) and store.dangling() == 0, "the row went to 0 and was deleted"
    b.settle(40, 0, reached_engine=True)
    await b.durable()
    assert counters(store) == (180, 0), "b's 40 charged though its lease has no row"
    if swept:
        leases.store.deregister("gw_a")
        assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 0
        leases.store.register("test", 0)
    c.settle(40, 0, reached_engine=True)
    await c.durable()
    assert counters(store) == (220, 0), "c's 40 charged: 140 + 40 + 40"
    assert await leases.stop()
    assert counters(store) == (220, 0) and store.dangling() == 0


async def test_a_swept_lease_whose_commit_acknowledgement_is_lost_is_never_under_charged(
    store: BudgetStore, clock: Clock
) -> None:
    """The commit that gives a swept lease's credit back lands, but its acknowledgement is lost (the connection
    drops at COMMIT, as in a database failover, which is what gets live processes swept). The process keeps what it
    handed over and hands it over again: charged twice (over, never under), never a credit given back twice. Named
    fake: ``settle_leases`` commits, then raises once."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    leases = process(store, "a", clock, lease_fraction=0.1)
    spent = 0
    for _ in range(2):
        hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
        assert hold is not None
        hold.settle(20, 0, reached_engine=True)
        spent += 20
    leases.store.deregister("gw_a")
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 1
    leases.store.register("test", 0)
    real = leases.store.settle_leases
    lost = []

    def acknowledgement_lost(moves: Any) -> Any:
        gone = real(moves)
        if not lost:
            lost.append(gone)
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        return gone

    leases.store.settle_leases = acknowledgement_lost  # type: ignore[method-assign]
    with pytest.raises(OperationalError):
        await leases.committed()
    assert lost and counters(store) == (spent, 0), "it landed: the credit went back, 40 charged"
    await leases.committed()
    assert counters(store) == (2 * spent, 0), "handed over again: charged again, the credit not given twice"
    assert await leases.stop()
    assert store.dangling() == 0


async def test_spending_of_a_lease_whose_commit_fails_is_committed_by_the_next(
    store: BudgetStore, clock: Clock
) -> None:
    """A commit the database refuses leaves what it carried with its lease, and the next commit carries it, also
    when the lease was idle or is being stopped (it used to be dropped in the same pass, and what the failed commit
    gave back went to a lease nobody committed any more: 140 spent, 0 charged). Named fake: ``settle_leases``
    refuses once, before its transaction."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1_000)
    leases = process(store, "a", clock, lease_fraction=0.0)
    await leases.start()
    hold = await leases.reserve(CHAIN, prompt_tokens=10, max_tokens=10)
    assert hold is not None
    hold.settle(140, 0, reached_engine=True)  # past its hold of 20
    real = leases.store.settle_leases
    refused: list[int] = []

    def refuse_once(moves: Any) -> Any:
        if not refused:
            refused.append(len(moves))
            raise OperationalError("BEGIN", {}, Exception("the database is restarting"))
        return real(moves)

    leases.store.settle_leases = refuse_once  # type: ignore[method-assign]
    assert await leases.stop(), "committed at the second try"
    assert refused == [1] and counters(store) == (140, 0) and store.dangling() == 0

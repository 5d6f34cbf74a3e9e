"""Budget reservations: clamp, refuse, settle, reset at period boundaries, exact under concurrency."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from appliance.budgets.store import BudgetExceededError, BudgetStore
from appliance.ledger.pricing import Price
from appliance.lib.windows import window
from tests.unit.budgets.conftest import CHAIN, Clock, add_budget


def test_no_budget_no_reservation(store: BudgetStore) -> None:
    grant = store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=50)
    assert (grant.max_tokens, grant.clamped, grant.reserved) == (50, False, False)


def test_max_tokens_is_clamped_to_what_the_tightest_budget_leaves(store: BudgetStore) -> None:
    add_budget(store, "tenant", "ten_1", "tokens", "day", 1000)
    add_budget(store, "workflow", "wf_1", "tokens", "hour", 100)
    grant = store.reserve("r1", CHAIN, prompt_tokens=30, max_tokens=None)
    assert (grant.max_tokens, grant.clamped) == (70, True)
    with pytest.raises(BudgetExceededError):  # r1 holds all the workflow's hour until it settles
        store.reserve("r2", CHAIN, prompt_tokens=10, max_tokens=None)


def test_refused_when_not_even_the_prompt_fits(store: BudgetStore) -> None:
    budget = add_budget(store, "workflow", "wf_1", "tokens", "hour", 100)
    store.reserve("r1", CHAIN, prompt_tokens=50, max_tokens=40)
    with pytest.raises(BudgetExceededError) as info:
        store.reserve("r2", CHAIN, prompt_tokens=20, max_tokens=5)
    error = info.value
    assert error.status_code == 429 and error.param == budget
    assert "10 tokens remain of 100" in error.message and int(error.headers["Retry-After"]) == 30 * 60


def test_settle_turns_the_hold_into_real_usage_and_frees_the_rest(store: BudgetStore) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "hour", 100)
    add_budget(store, "tenant", "ten_1", "requests", "day", 10)
    store.reserve("r1", CHAIN, prompt_tokens=20, max_tokens=70)
    store.settle("r1", total_tokens=35)
    rows = {row["kind"]: row for row in store.status()}
    assert (rows["tokens"]["used"], rows["tokens"]["reserved"], rows["tokens"]["remaining"]) == (35, 0, 65)
    assert (rows["requests"]["used"], rows["requests"]["reserved"]) == (1, 0)
    assert store.dangling() == 0


def test_budgets_reset_at_the_local_period_boundary(store: BudgetStore, clock: Clock) -> None:
    add_budget(store, "tenant", "ten_1", "requests", "day", 1)
    store.reserve("r1", CHAIN, prompt_tokens=1, max_tokens=1)
    store.settle("r1", 2)
    with pytest.raises(BudgetExceededError):
        store.reserve("r2", CHAIN, prompt_tokens=1, max_tokens=1)
    clock.moment = datetime(2026, 11, 22, 22, 59, tzinfo=UTC)  # 23:59 in Paris: same day
    with pytest.raises(BudgetExceededError):
        store.reserve("r3", CHAIN, prompt_tokens=1, max_tokens=1)
    clock.moment = datetime(2026, 11, 22, 23, 0, tzinfo=UTC)  # midnight in Paris: a new day
    assert store.reserve("r4", CHAIN, prompt_tokens=1, max_tokens=1).reserved


def test_a_per_request_cap_applies_without_a_period(store: BudgetStore) -> None:
    add_budget(store, "api_key", "key_1", "max_tokens", "none", 16)
    grant = store.reserve("r1", CHAIN, prompt_tokens=100, max_tokens=500)
    assert (grant.max_tokens, grant.clamped, grant.reserved) == (16, True, False)


def test_concurrent_reservations_never_exceed_the_budget(store: BudgetStore) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "hour", 10_000)
    add_budget(store, "tenant", "ten_1", "requests", "hour", 1_000)  # two counters per request: lock order matters
    granted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(20)  # the first of them race to open the window's counter

    def request(n: int) -> None:
        if n < 20:
            start.wait()
        try:
            grant = store.reserve(f"r{n}", CHAIN, prompt_tokens=20, max_tokens=80)
        except BudgetExceededError:
            with lock:
                refused.append(n)
            return
        store.settle(f"r{n}", total_tokens=20 + (grant.max_tokens or 0))
        with lock:
            granted.append(grant.max_tokens or 0)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) + len(refused) == 200, "every reservation was either granted or refused, none failed"
    row, calls = sorted(store.status(), key=lambda r: r["kind"] != "tokens")
    assert row["used"] <= 10_000 and row["reserved"] == 0 and store.dangling() == 0
    assert row["used"] == sum(20 + g for g in granted) and calls["used"] == len(granted)
    assert refused, "200 requests of up to 100 tokens cannot all fit in 10,000"


def test_windows_follow_the_zone_across_dst() -> None:
    paris = ZoneInfo("Europe/Paris")
    start, end = window("minute", datetime(2026, 3, 29, 12, 7, 42, 5, tzinfo=UTC), paris)
    assert (start, end) == (datetime(2026, 3, 29, 12, 7, tzinfo=UTC), datetime(2026, 3, 29, 12, 8, tzinfo=UTC))
    start, end = window("day", datetime(2026, 3, 29, 12, tzinfo=UTC), paris)  # the spring-forward day
    assert end - start == timedelta(hours=23)
    start, end = window("month", datetime(2026, 2, 10, tzinfo=UTC), paris)
    assert (start, end) == (datetime(2026, 1, 31, 23, tzinfo=UTC), datetime(2026, 2, 28, 23, tzinfo=UTC))


def on_gateway(store: BudgetStore, gateway_id: str, clock: Clock) -> BudgetStore:
    """The same database seen by the gateway process ``gateway_id`` (registered now)."""
    gateway = BudgetStore(store._engine, ZoneInfo("Europe/Paris"), clock, gateway_id=gateway_id)
    gateway.register("host", 1)
    return gateway


def test_a_live_gateways_reservation_survives_any_age_and_is_charged(store: BudgetStore, clock: Clock) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1000)
    gateway = on_gateway(store, "gw_live", clock)
    gateway.reserve("long-stream", CHAIN, prompt_tokens=30, max_tokens=600)
    for _ in range(12):  # an hour-long stream; the gateway beats all along
        clock.moment += timedelta(minutes=5)
        assert gateway.heartbeat("gw_live")
        assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 0
    assert store.status()[0]["reserved"] == 630
    assert gateway.settle("long-stream", total_tokens=500) == 1
    [row] = store.status()
    assert (row["used"], row["reserved"], store.dangling()) == (500, 0, 0)


def test_a_dead_gateways_reservations_are_released_and_its_row_removed(store: BudgetStore, clock: Clock) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1000)
    live, dead = on_gateway(store, "gw_live", clock), on_gateway(store, "gw_dead", clock)
    live.reserve("kept", CHAIN, prompt_tokens=10, max_tokens=20)
    dead.reserve("crashed", CHAIN, prompt_tokens=10, max_tokens=40)
    clock.moment += timedelta(seconds=20)
    live.heartbeat("gw_live")
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 0  # silent 20 s: not yet dead
    clock.moment += timedelta(seconds=20)
    live.heartbeat("gw_live")
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 1  # silent 40 s: its reservation goes
    assert store.status()[0]["reserved"] == 30 and store.dangling() == 1
    assert not dead.heartbeat("gw_dead"), "the dead gateway's row is gone: it must register again"
    assert dead.settle("crashed", total_tokens=50) == 0, "a late settlement of released rows changes nothing"
    assert store.status()[0]["used"] == 0


def test_a_gateway_without_a_row_is_dead(store: BudgetStore, clock: Clock) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1000)
    ghost = BudgetStore(store._engine, ZoneInfo("Europe/Paris"), clock, gateway_id="gw_never_registered")
    ghost.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 1
    assert store.status()[0]["reserved"] == 0


def test_reservations_without_a_gateway_fall_back_to_the_age_rule(store: BudgetStore, clock: Clock) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 100)  # the same window before and after
    store.reserve("before-0008", CHAIN, prompt_tokens=30, max_tokens=60)  # no gateway id: made before liveness
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 0  # still young: it may be streaming
    assert store.status()[0]["reserved"] == 90
    clock.moment += timedelta(minutes=31)
    assert store.sweep(dead_after_s=30, unowned_ttl_s=1800) == 1
    [row] = store.status()
    assert (row["reserved"], row["used"], store.dangling()) == (0, 0, 0)


def test_settle_is_idempotent(store: BudgetStore) -> None:
    add_budget(store, "workflow", "wf_1", "tokens", "day", 1000)
    add_budget(store, "tenant", "ten_1", "requests", "day", 10)
    store.reserve("r1", CHAIN, prompt_tokens=10, max_tokens=40)
    assert store.settle("r1", total_tokens=25) == 2
    assert store.settle("r1", total_tokens=25) == 0  # a replay of a settlement that landed
    rows = {row["kind"]: row for row in store.status()}
    assert (rows["tokens"]["used"], rows["tokens"]["reserved"], rows["requests"]["used"]) == (25, 0, 1)


def test_settle_and_sweep_racing_take_each_reservation_once(store: BudgetStore, clock: Clock) -> None:
    """A gateway declared dead while it still settles: each reservation is either charged by the settlement
    or released by the sweep, never both (which would leave the counter's reservations negative)."""
    add_budget(store, "workflow", "wf_1", "tokens", "day", 100_000)
    add_budget(store, "tenant", "ten_1", "requests", "day", 1_000)
    slow = on_gateway(store, "gw_slow", clock)
    for n in range(60):
        slow.reserve(f"r{n}", CHAIN, prompt_tokens=10, max_tokens=90)
    clock.moment += timedelta(minutes=1)  # its heartbeat is a minute old: dead to the sweepers
    settled: list[int] = []
    swept: list[int] = []
    start = threading.Barrier(3)

    def settle() -> None:
        start.wait()
        settled.extend(slow.settle(f"r{n}", total_tokens=70) for n in range(60))

    def sweep() -> None:
        start.wait()
        for _ in range(20):
            swept.append(store.sweep(dead_after_s=30, unowned_ttl_s=1800))

    threads = [threading.Thread(target=settle), threading.Thread(target=sweep), threading.Thread(target=sweep)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = {row["kind"]: row for row in store.status()}
    charged = sum(settled) // 2  # two reservation rows (tokens, requests) per request
    assert sum(settled) + sum(swept) == 120, "every reservation row was taken exactly once"
    assert (rows["tokens"]["reserved"], rows["requests"]["reserved"], store.dangling()) == (0, 0, 0)
    assert (rows["tokens"]["used"], rows["requests"]["used"]) == (70 * charged, charged)


def test_money_budget_reserves_the_priced_hold_and_settles_the_real_cost(store: BudgetStore) -> None:
    add_budget(store, "tenant", "ten_1", "cost", "month", 100_000)  # 0.1 in micro-units
    price = Price(prompt=1000.0, completion=2000.0)
    grant = store.reserve("r1", CHAIN, prompt_tokens=20, max_tokens=None, price=price)
    assert (grant.max_tokens, grant.clamped) == (40, True)  # 0.02 for the prompt, 0.08 buys 40 tokens
    [row] = store.status()
    assert (row["reserved"], row["remaining"]) == (0.1, 0.0)
    store.settle("r1", total_tokens=30, cost_micros=price.cost(20, 10))
    [row] = store.status()
    assert (row["used"], row["reserved"], row["remaining"]) == (0.04, 0.0, 0.06)
    with pytest.raises(BudgetExceededError, match="money budget"):
        store.reserve("r2", CHAIN, prompt_tokens=60, max_tokens=5, price=price)

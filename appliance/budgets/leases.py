"""Budgets enforced from memory: every gateway process holds a *lease*, a slice of each budget window its
requests draw on, granted atomically by the database (:meth:`BudgetStore.grant`).

A request reserves from the leases of its chain in memory and settles into them in memory; no database
transaction stands between a request and its engine while its leases hold enough. A lease that runs short is
refilled (one transaction, one refill at a time per lease; the requests that need it wait for that one). What
requests spent is moved to the budget's `used` in group commits (:meth:`BudgetStore.settle_leases`, one
transaction for every lease of the process, ``commit_interval_s`` after the first settlement that needs one).
An answer does not wait for that commit: until then its spending is part of its lease, which the database
counts as reserved, and charges in full if the process dies.

Exactness: a lease is a reservation row of its process, so the database never lets the slices and the spending
of all processes together exceed a limit, and no process draws more than its slices. What a lease costs a
budget's precision: a slice another process holds unused can make a request wait for a refill or be refused
(or clamped) though the budget is not spent. Each slice beyond what a request needs is at most
``lease_fraction`` of the limit and at most half of what remains, and a lease unused for ``lease_idle_s`` is
given back; so at most (processes - 1) x ``lease_fraction`` x limit is held where it is not used, and near the
end of a budget much less. A process that dies leaves its leases to the sweep (liveness, as for any
reservation), which charges them in full: what it spent since its last commit is not known (only requests not
yet committed), and a budget stays an upper bound; a crash over-charges by the dead process's unused slices at
most. A process that cannot commit at shutdown keeps its gateway row, so its
leases go the same way. A process swept while alive (silent past ``gateway_dead_after_s``) finds out at its next
commit (``BudgetStore.settle_leases``: the sweep left what it charged as the lease's credit): each swept lease stops
serving, what its requests spend is charged only beyond that credit, and the rest of it goes back once none of them
is in flight; a refill is refused until the process has registered again, then it leases afresh under new ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from appliance.budgets.ratelimit import RateWindow, keep_tightest
from appliance.budgets.store import (
    LEASE_PREFIX,
    PERIODIC,
    BudgetStore,
    Grant,
    LeaseMove,
    _amount,
    _exceeded,
    per_request_cap,
)
from appliance.ledger.pricing import Price
from appliance.lib.recheck import RECHECK_S, Recheck
from appliance.lib.windows import window

log = logging.getLogger(__name__)

DURABLE_WAIT_S = 10.0  # an answer waits this long at most for its spending to be committed, then goes anyway


def chain_key(chain: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(chain.items()))


class Lease:
    """This process's slice of one budget window."""

    __slots__ = (
        "budget",
        "end",
        "granted",
        "held",
        "id",
        "last_used",
        "refill",
        "registration",
        "remaining",
        "spent",
        "start",
        "swept",
    )

    def __init__(
        self, lease_id: str, budget: dict[str, Any], start: datetime, end: datetime, now: float, registration: int = 0
    ) -> None:
        self.id = lease_id
        self.registration = registration  # of its process (BudgetStore.registration) when it was made
        # A sweep took its process for dead and charged its row in full, and part of that charge may wait in the
        # database as its credit: one final commit, once none of its requests is in flight, gives it back.
        self.swept = False
        self.budget = budget
        self.start, self.end = start, end
        self.granted = 0  # what the database holds for this lease (its reservation row's amount)
        self.held = 0  # taken by requests in flight
        self.spent = 0  # settled by requests, not yet committed as `used`
        self.remaining = 0  # what the database had left beyond the slices at the last refill (for headers)
        self.last_used = now
        self.refill = asyncio.Lock()

    @property
    def free(self) -> int:
        return self.granted - self.held - self.spent


@dataclass(slots=True)
class LeasedHold:
    """One request's reservation: what it drew from each lease of its chain. Settled exactly once, in memory."""

    leases: BudgetLeases
    grant: Grant
    draws: list[tuple[Lease, int]] = field(default_factory=list)
    settled: bool = False

    def settle(self, total_tokens: int, cost_micros: int, reached_engine: bool) -> None:
        """Turn the draws into spending (the real tokens, the real cost, one call if the engine was asked)."""
        if self.settled:
            return
        self.settled = True
        for lease, amount in self.draws:
            kind = lease.budget["kind"]
            lease.held -= amount
            lease.spent += {"tokens": total_tokens, "cost": cost_micros}.get(kind, int(reached_engine))
        self.leases.changed()

    async def durable(self) -> None:
        """Wait until what this request spent is committed. An answer need not: until then its spending is
        part of the lease, which the database holds as reserved and charges in full if the process dies."""
        if self.draws:
            await self.leases.committed()


class BudgetLeases:
    def __init__(
        self,
        store: BudgetStore,
        zone: ZoneInfo,
        *,
        lease_fraction: float = 0.02,
        idle_s: float = 10.0,
        commit_interval_s: float = 0.5,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        assert store.gateway_id is not None, "leases belong to a gateway process"
        self.store = store
        self._zone = zone
        self._fraction = lease_fraction
        self._idle_s = idle_s
        self._commit_interval_s = commit_interval_s
        self._clock = clock or (lambda: datetime.now(UTC))
        self._monotonic = monotonic or time.monotonic
        self._rules: Recheck[tuple[tuple[str, str], ...], list[dict[str, Any]]] = Recheck(
            self._look_up_rules, ttl_s=recheck_s
        )
        self._leases: dict[tuple[str, datetime], Lease] = {}
        self._windows: dict[str, tuple[datetime, datetime]] = {}
        self._retired: list[Lease] = []  # leases of a budget whose limit changed, until their requests settle
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty = asyncio.Event()
        self._hurry = asyncio.Event()  # someone waits for the next commit: no more gathering
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._topping_up: set[asyncio.Task[None]] = set()  # refills ahead of need, in the background

    # -- what applies ------------------------------------------------------------------------------------

    async def rules(self, chain: dict[str, str]) -> list[dict[str, Any]]:
        """The chain's budgets, as the database had them at most ``recheck_s`` ago."""
        if not chain:
            return []
        return await self._rules.get(chain_key(chain))

    def rules_changed(self) -> None:
        """This process changed a budget: look every chain up again at its next request."""
        self._rules.clear()

    async def _look_up_rules(self, key: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
        rules = await asyncio.to_thread(self.store.chain_budgets, dict(key))
        if self._retire_changed(rules):
            await self._commit_once()  # their slices go back before anyone refills under the new limit
        return rules

    def _retire_changed(self, rules: list[dict[str, Any]]) -> bool:
        """A budget whose limit changed: its leases stop serving (requests in flight still settle into them) and
        give back what they hold unused; new leases are measured against the new limit. True: some retired."""
        limits = {rule["id"]: rule["limit"] for rule in rules}
        retired = False
        for lease in list(self._leases.values()):
            if lease.budget["id"] in limits and limits[lease.budget["id"]] != lease.budget["limit"]:
                self._retire(lease)
                retired = True
        return retired

    # -- reserving ---------------------------------------------------------------------------------------

    async def reserve(
        self,
        chain: dict[str, str],
        prompt_tokens: int,
        max_tokens: int | None,
        price: Price | None = None,
        *,
        min_output: int = 1,
    ) -> LeasedHold | None:
        """Take what the request may spend from every periodic budget of its chain (the prompt plus
        ``max_tokens``, clamped to what the tightest budget leaves; one call; their cost at ``price``), or
        refuse (429). None: no budget applies. The same contract as :meth:`BudgetStore.reserve`, from memory."""
        rules = await self.rules(chain)
        if not rules:
            return None
        price = price or Price()
        for _ in range(8):  # other requests may take what a refill brought; try again (each try refills)
            now = self._clock()
            cap: float = math.inf if max_tokens is None else max_tokens
            periodic: list[tuple[dict[str, Any], Lease]] = []
            for rule in rules:
                if rule["kind"] == "max_tokens":
                    cap = per_request_cap(rule, min_output, cap)
                elif rule["kind"] in PERIODIC:
                    periodic.append((rule, self._lease(rule, now)))
            wanted = None if cap == math.inf else int(cap)
            short = []
            for rule, lease in periodic:
                want = _amount(rule["kind"], prompt_tokens, wanted or 0, price)
                if lease.free < want:
                    short.append((lease, want, _amount(rule["kind"], prompt_tokens, min_output, price)))
            refilled = (
                await asyncio.gather(*(self._refill(lease, want, least) for lease, want, least in short))
                if short
                else []
            )
            spent_out = {id(lease) for (lease, _, _), enough in zip(short, refilled, strict=True) if not enough}
            hold = self._take(periodic, prompt_tokens, cap, max_tokens, price, min_output, now, spent_out)
            if hold is not None:
                for _, lease in periodic:
                    self._top_up_if_low(lease)
                return hold
        raise _exceeded(periodic[0][0], 0, periodic[0][1].end, self._clock(), fits_a_window=True)

    def _take(
        self,
        periodic: list[tuple[dict[str, Any], Lease]],
        prompt_tokens: int,
        cap: float,
        max_tokens: int | None,
        price: Price,
        min_output: int,
        now: datetime,
        spent_out: set[int],
    ) -> LeasedHold | None:
        """With no await in between: check every lease, clamp, take. None: a lease ran short meanwhile."""
        for rule, lease in periodic:
            least = _amount(rule["kind"], prompt_tokens, min_output, price)
            if lease.free < least:
                if id(lease) in spent_out:  # its refill could not bring even that: the budget is spent
                    left = max(lease.free, 0) + lease.remaining
                    raise _exceeded(rule, left, lease.end, now, fits_a_window=least <= rule["limit"])
                return None  # others took what its refill brought: try again
            if rule["kind"] == "tokens":
                cap = min(cap, lease.free - prompt_tokens)
            elif rule["kind"] == "cost":
                affordable = price.affordable(prompt_tokens, lease.free)
                cap = cap if affordable is None else min(cap, affordable)
        granted = None if cap == math.inf else int(cap)
        draws: list[tuple[Lease, int]] = []
        rates: dict[str, RateWindow] = {}
        for rule, lease in periodic:
            amount = _amount(rule["kind"], prompt_tokens, granted or 0, price)
            lease.held += amount
            lease.last_used = self._monotonic()
            draws.append((lease, amount))
            if rule["period"] == "minute" and rule["kind"] in ("tokens", "requests"):
                rate = RateWindow(rule["limit"], lease.free + lease.remaining, (lease.end - now).total_seconds())
                keep_tightest(rates, rule["kind"], rate)
        grant = Grant(
            granted,
            clamped=granted is not None and (max_tokens is None or granted < max_tokens),
            reserved=bool(periodic),
            prompt_tokens=prompt_tokens,
            minute_requests=rates.get("requests"),
            minute_tokens=rates.get("tokens"),
        )
        return LeasedHold(self, grant, draws)

    def _window(self, period: str, now: datetime) -> tuple[datetime, datetime]:
        """The period's window holding ``now`` (kept until it ends: every request asks for it)."""
        known = self._windows.get(period)
        if known is None or not known[0] <= now < known[1]:
            known = self._windows[period] = window(period, now, self._zone)
        return known

    def _lease(self, rule: dict[str, Any], now: datetime) -> Lease:
        start, end = self._window(rule["period"], now)
        lease = self._leases.get((rule["id"], start))
        registration = self.store.registration
        if lease is not None and lease.registration != registration:
            # The process registered again: a sweep took it for dead and charged this lease in full. It stops
            # serving; its requests in flight still settle into it, and its commits find it swept.
            self._retire(lease)
            lease = None
        if lease is None:
            lease_id = f"{LEASE_PREFIX}{self.store.gateway_id}:{start:%Y%m%d%H%M}"
            if registration > 1:  # never the id of a swept lease
                lease_id += f":{registration}"
            lease = Lease(lease_id, rule, start, end, self._monotonic(), registration)
            self._leases[(rule["id"], start)] = lease
        return lease

    def _retire(self, lease: Lease) -> None:
        """The lease serves no new request; those in flight settle into it, and it is given back as they end."""
        key = (lease.budget["id"], lease.start)
        if self._leases.get(key) is lease:
            del self._leases[key]
            self._retired.append(lease)

    async def _refill(self, lease: Lease, want: int, least: int) -> bool:
        """One refill at a time per lease: the requests that find it short wait for that one. False: not even
        ``least`` could be had."""
        async with lease.refill:
            if lease.free >= want:
                return True
            await self._grant(lease, need=want - lease.free, least=least - lease.free, extra=self._slice(lease))
            return lease.free >= least

    async def _grant(self, lease: Lease, *, need: int, least: int, extra: int) -> None:
        """One grant from the database into ``lease`` (the caller holds its refill lock). Shielded: a request that
        leaves meanwhile must not lose what the database granted to the lease."""

        async def grant() -> None:
            granted, remaining = await asyncio.to_thread(
                self.store.grant,
                lease.id,
                lease.budget["id"],
                lease.start,
                need=need,
                least=least,
                extra=extra,
                registration=lease.registration,
            )
            lease.granted += granted
            lease.remaining = remaining

        await asyncio.shield(asyncio.create_task(grant()))

    def _slice(self, lease: Lease) -> int:
        """What one grant adds for later requests: ``lease_fraction`` of the budget's limit."""
        return math.ceil(int(lease.budget["limit"]) * self._fraction)

    def _top_up_if_low(self, lease: Lease) -> None:
        """Refill ahead of need: once a lease has less than half its slice free, one background grant brings it
        back to a slice (never more: a process holds at most ``lease_fraction`` of a limit, as without it), so
        the requests that follow find it full instead of waiting for the database."""
        slice_ = self._slice(lease)
        if self._stopping or lease.free >= slice_ / 2 or lease.refill.locked():
            return
        task = asyncio.create_task(self._top_up(lease, slice_))
        self._topping_up.add(task)
        task.add_done_callback(self._topped_up)

    async def _top_up(self, lease: Lease, slice_: int) -> None:
        async with lease.refill:
            short = slice_ - lease.free
            if short <= slice_ / 2:
                return  # a request's refill came first
            # need 0: only the extra, which takes at most half of what remains (fair to the other processes).
            await self._grant(lease, need=0, least=0, extra=short)

    def _topped_up(self, task: asyncio.Task[None]) -> None:
        self._topping_up.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("refilling a budget lease ahead of need failed: %s", task.exception())

    # -- committing --------------------------------------------------------------------------------------

    def in_flight(self) -> dict[tuple[str, datetime], int]:
        """What this process's requests in flight hold, by (budget, window start)."""
        held: dict[tuple[str, datetime], int] = {}
        for lease in [*self._leases.values(), *self._retired]:
            key = (lease.budget["id"], lease.start)
            held[key] = held.get(key, 0) + lease.held
        return held

    def changed(self) -> None:
        self._dirty.set()

    async def committed(self) -> None:
        """Wait for the next commit to land (it carries everything settled before this call)."""
        if self._task is None:  # not started (tests of one request): commit now
            await self._commit_once()
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._dirty.set()
        self._hurry.set()
        try:
            await asyncio.wait_for(asyncio.shield(future), DURABLE_WAIT_S)
        except TimeoutError:
            log.warning("budget spending not yet committed after %.0fs; answering anyway", DURABLE_WAIT_S)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="budget-leases")

    async def stop(self) -> bool:
        """Commit what was spent and give every lease back (after the last request). False: the database
        refused, and the leases stay with this process's gateway row (the sweep charges them in full)."""
        self._stopping = True
        self._hurry.set()
        if self._topping_up:  # what they are granted is given back with the rest
            await asyncio.wait(list(self._topping_up))
        self._dirty.set()
        if self._task is not None:
            await self._task
            self._task = None
        else:
            await self._commit_once()
        return not any(lease.spent or lease.granted for lease in [*self._leases.values(), *self._retired])

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=1.0)
                if not self._stopping and not self._waiters:
                    # What settles meanwhile joins this commit; one that is waited for (or the stop) cuts it short.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._commit_interval_s)
            except TimeoutError:
                pass
            self._dirty.clear()
            self._hurry.clear()
            try:
                moved = await self._commit_once()
                backoff = 0.05
            except Exception:
                log.exception("committing budget spending failed; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._dirty.set()
                if self._stopping and backoff >= 2.0:
                    self._lost()
                    return
                continue
            if self._stopping and (not (self._leases or self._retired) or not moved):
                return
            if self._stopping:
                self._dirty.set()  # once more at once: the leases that handed their last over are dropped

    async def _commit_once(self) -> int:
        """Commit what the leases hand over; returns how many moves it made."""
        waiters, self._waiters = self._waiters, []
        moves, taken = self._collect()
        if not moves:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return 0
        try:
            gone = await asyncio.to_thread(self.store.settle_leases, moves)
        except BaseException:
            for lease, spent, returned in taken:  # not committed: still this process's
                lease.spent += spent
                lease.granted += spent + returned
            self._waiters.extend(waiters)
            raise
        for move, (lease, _, _) in zip(moves, taken, strict=True):
            swept = gone.get((lease.id, lease.budget["id"]))
            if swept is None:
                continue
            lease.granted = lease.held + lease.spent  # nothing free: the next request refills it (or a new lease)
            if swept:
                if not lease.swept:
                    log.warning("budget lease %s was swept with this gateway (taken for dead)", lease.id)
                self._retire(lease)
            lease.swept = swept and not move.final
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return len(moves)

    def _collect(self) -> tuple[list[LeaseMove], list[tuple[Lease, int, int]]]:
        """What each lease hands over now: its spending, and its unused slice where it is idle, past its window
        or being stopped. Taken from the lease at once (a failed commit gives it back), so requests meanwhile
        never draw on what is being returned."""
        now, today = self._monotonic(), self._clock()
        moves: list[LeaseMove] = []
        taken: list[tuple[Lease, int, int]] = []
        serving = list(self._leases.items())
        for key, lease in [*serving, *((None, lease) for lease in self._retired)]:
            idle = lease.held == 0 and (self._stopping or today >= lease.end or now - lease.last_used >= self._idle_s)
            spent = lease.spent
            returned = lease.free if (idle or key is None) and lease.free > 0 else 0
            final = lease.held == 0
            if spent or returned or (lease.swept and final):
                lease.spent -= spent
                lease.granted -= spent + returned
                moves.append(LeaseMove(lease.id, lease.budget["id"], lease.start, spent, returned, final=final))
                taken.append((lease, spent, returned))
            elif idle and lease.granted <= 0 and lease.spent == 0 and not lease.refill.locked():
                # Only once nothing of it is on its way: a commit that fails gives what it carried back to the lease.
                if key is None:
                    self._retired.remove(lease)
                else:
                    del self._leases[key]
        return moves, taken

    def _lost(self) -> None:
        for lease in [*self._leases.values(), *self._retired]:
            if lease.spent:
                log.critical(
                    "budget spending NOT committed at shutdown (the database refused it): lease %s, budget %s, %d",
                    lease.id,
                    lease.budget["id"],
                    lease.spent,
                )

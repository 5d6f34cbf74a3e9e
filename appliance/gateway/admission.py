"""Admission control: requests to a generative engine wait in a queue tier chosen by their real prompt
length (short or long context), each tier with its own concurrency limit and queue timeout.

A long-context prefill holds the engine for a long time; if long requests can fill every slot, the short
interactive ones queue behind them and their P99 time to first token climbs while P50 stays flat. Capping
the long tier keeps room for short requests whatever arrives. Limits come from configuration, never from
GPU utilisation. Within a tier, requests of priority tenants or workflows are admitted first; otherwise in
arrival order. A request that waits past its tier's timeout gets 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from dataclasses import dataclass, field

from appliance.lib.errors import ServiceUnavailableError
from appliance.settings import AdmissionSettings

SHORT, LONG = "short", "long"


class QueueTimeoutError(ServiceUnavailableError):
    code = "admission_timeout"


@dataclass(order=True)
class _Waiter:
    priority: int
    sequence: int
    future: asyncio.Future[None] = field(compare=False)


class Tier:
    def __init__(self, name: str, limit: int, timeout_s: float) -> None:
        self.name = name
        self.limit = limit
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.admitted = 0
        self.timed_out = 0
        self._waiters: list[_Waiter] = []
        self._sequence = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.future.done())

    async def acquire(self, priority: int = 1) -> None:
        """Take a slot, waiting in line (lower ``priority`` first) at most the tier's timeout."""
        if self.in_flight < self.limit and not self.waiting:
            self.in_flight += 1
            self.admitted += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, _Waiter(priority, next(self._sequence), future))
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            self._abandon(future)
            self.timed_out += 1
            raise QueueTimeoutError(
                f"The {self.name}-context queue is full: no slot freed up within {self.timeout_s:g}s. Retry later.",
                headers={"Retry-After": str(max(1, math.ceil(self.timeout_s / 4))), "x-should-retry": "true"},
            ) from None
        except asyncio.CancelledError:
            self._abandon(future)
            raise
        self.admitted += 1

    def _abandon(self, future: asyncio.Future[None]) -> None:
        """Leave the line; a slot handed over just as the wait ended is given back."""
        if future.done() and not future.cancelled():
            self.release()
        future.cancel()

    def release(self) -> None:
        """Free a slot, handing it straight to the first waiter in line (if any)."""
        while self._waiters:
            waiter = heapq.heappop(self._waiters)
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes on: in_flight stays
                return
        self.in_flight = max(self.in_flight - 1, 0)


@dataclass
class Ticket:
    """A request's slot; released exactly once when the request ends."""

    tier: Tier
    until_first_token: bool = False  # give the slot back at the first token of a streamed answer
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.tier.release()


class Admission:
    """The tiers of every generative engine (one set per engine, by its route key)."""

    def __init__(self, settings: AdmissionSettings) -> None:
        self.settings = settings
        self._tiers: dict[str, dict[str, Tier]] = {}

    def tiers(self, engine: str) -> dict[str, Tier]:
        if engine not in self._tiers:
            s = self.settings
            self._tiers[engine] = {
                SHORT: Tier(SHORT, s.short_concurrency, s.short_queue_timeout_s),
                LONG: Tier(LONG, s.long_concurrency, s.long_queue_timeout_s),
            }
        return self._tiers[engine]

    def tier_of(self, prompt_tokens: int) -> str:
        return LONG if prompt_tokens >= self.settings.long_prompt_tokens else SHORT

    def priority(self, tenant_id: str | None, workflow_id: str | None) -> int:
        favoured = self.settings.priority_scopes
        return 0 if (tenant_id in favoured or workflow_id in favoured) else 1

    async def admit(self, engine: str, prompt_tokens: int, priority: int = 1) -> Ticket:
        tier = self.tiers(engine)[self.tier_of(prompt_tokens)]
        await tier.acquire(priority)
        return Ticket(tier, until_first_token=self.settings.slot_until_first_token)

    def snapshot(self) -> dict[str, dict[str, dict[str, int]]]:
        return {
            model: {
                name: {
                    "limit": tier.limit,
                    "in_flight": tier.in_flight,
                    "waiting": tier.waiting,
                    "admitted": tier.admitted,
                    "timed_out": tier.timed_out,
                }
                for name, tier in tiers.items()
            }
            for model, tiers in self._tiers.items()
        }

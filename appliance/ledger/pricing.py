"""The cost model: what one request costs, in micro-units of the configured currency (integers, so budgets
add up exactly).

A model with a configured price is charged per million prompt and completion tokens. Any other model is
charged the node's amortised cost: the configured cost per GPU-hour spread over the tokens per second the
node really processes, which :class:`ThroughputMeter` measures from the gateway's own traffic (tokens
finished per second while at least one request is in flight).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.settings import PricingSettings

MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-units of currency per token; fixed for a request when it is admitted."""

    prompt: float = 0.0
    completion: float = 0.0
    source: str = "none"  # configured | amortised | none

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Micro-units, rounded up so that a reservation always covers what it settles."""
        exact = prompt_tokens * self.prompt + completion_tokens * self.completion
        return math.ceil(exact - 1e-9) if exact > 0 else 0

    def affordable(self, prompt_tokens: int, micros: int) -> int | None:
        """The most completion tokens ``micros`` pays for after the prompt (None: completions are free)."""
        if self.completion <= 0:
            return None
        n = max(math.floor((micros - prompt_tokens * self.prompt) / self.completion), 0)
        while n > 0 and self.cost(prompt_tokens, n) > micros:
            n -= 1
        return n

    @property
    def free(self) -> bool:
        return self.prompt <= 0 and self.completion <= 0


def to_currency(micros: int | float) -> float:
    return round(micros / MICROS, 6)


def to_micros(amount: float) -> int:
    return round(amount * MICROS)


class ThroughputMeter:
    """Tokens the node processes per second of busy time, over a rolling window.

    :meth:`begin` when a request goes to an engine, :meth:`end` with its tokens when it is done. Busy time
    is wall time with at least one request in flight, so concurrent requests sharing the engine are not
    counted twice: the figure is the node's throughput, which is what its hourly cost buys."""

    def __init__(self, window_s: float, min_busy_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._min_busy_s = min_busy_s
        self._clock = clock
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy_s = 0.0
        self._tokens = 0
        self._window_started = clock()
        self._measured: float | None = None

    def begin(self) -> None:
        if self._in_flight == 0:
            self._busy_since = self._clock()
        self._in_flight += 1

    def end(self, tokens: int) -> None:
        now = self._clock()
        self._tokens += tokens
        self._in_flight = max(self._in_flight - 1, 0)
        if self._in_flight == 0:
            self._busy_s += now - self._busy_since
        if now - self._window_started >= self._window_s:
            self._roll(now)

    def _current(self, now: float) -> float | None:
        """This window's figure, once it has enough busy time (the busy spell still open included)."""
        busy = self._busy_s + (now - self._busy_since if self._in_flight else 0.0)
        return self._tokens / busy if busy >= self._min_busy_s and self._tokens > 0 else None

    def _roll(self, now: float) -> None:
        self._measured = self._current(now) or self._measured
        self._tokens, self._busy_s, self._window_started = 0, 0.0, now
        if self._in_flight:
            self._busy_since = now

    def tokens_per_second(self) -> float | None:
        """The current window's figure once it has enough busy time, else the last full window's."""
        return self._current(self._clock()) or self._measured


class Pricing:
    def __init__(self, settings: PricingSettings, meter: ThroughputMeter | None = None) -> None:
        self.settings = settings
        self.meter = meter or ThroughputMeter(settings.measure_window_s, settings.min_busy_s)

    @property
    def currency(self) -> str:
        return self.settings.currency

    def price(self, model: str) -> Price:
        configured = self.settings.models.get(model)
        if configured is not None:
            return Price(
                configured.prompt_per_million, configured.completion_per_million, source="configured"
            )  # per million tokens in currency = micro-units per token
        hour_cost = self.settings.hour_cost
        if hour_cost is None:
            return Price()
        throughput = self.meter.tokens_per_second() or self.settings.tokens_per_second
        assert throughput is not None  # the settings require a starting figure with a node cost
        per_token = hour_cost * MICROS / 3600.0 / throughput
        return Price(per_token, per_token, source="amortised")

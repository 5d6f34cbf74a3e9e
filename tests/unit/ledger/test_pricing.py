"""The cost model: configured prices, the node's amortised cost over measured throughput, exact rounding."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from appliance.ledger.pricing import Price, Pricing, ThroughputMeter, to_currency, to_micros
from appliance.settings import ModelPrice, PricingSettings


class Tick:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cost_is_rounded_up_in_micro_units_so_a_reservation_covers_its_settlement() -> None:
    price = Price(prompt=0.15, completion=0.6)  # 0.15 and 0.6 per million tokens
    assert price.cost(0, 0) == 0
    assert price.cost(10, 0) == 2  # 1.5 micro-units, rounded up
    assert price.cost(1_000_000, 1_000_000) == 750_000
    assert to_currency(price.cost(1_000_000, 1_000_000)) == 0.75 and to_micros(0.75) == 750_000


def test_affordable_completion_tokens() -> None:
    price = Price(prompt=1000.0, completion=2000.0)
    assert price.affordable(prompt_tokens=8, micros=50_000) == 21
    assert price.affordable(prompt_tokens=8, micros=8_000) == 0
    assert price.cost(8, price.affordable(8, 12_345) or 0) <= 12_345
    assert Price(prompt=1.0, completion=0.0).affordable(8, 10) is None  # completions are free


def test_a_configured_price_wins_over_the_amortised_cost() -> None:
    settings = PricingSettings(
        models={"big": ModelPrice(prompt_per_million=3.0, completion_per_million=15.0)},
        gpu_hour_cost=3.6,
        tokens_per_second=1000.0,
    )
    pricing = Pricing(settings)
    assert pricing.price("big") == Price(3.0, 15.0, "configured")
    amortised = pricing.price("small")  # 3.6 per hour over 1000 tokens/s = 1 micro-unit per token
    assert amortised.source == "amortised" and amortised.prompt == pytest.approx(1.0)
    assert Pricing(PricingSettings()).price("small").free


def test_amortised_cost_needs_a_starting_throughput() -> None:
    with pytest.raises(ValidationError, match="tokens_per_second"):
        PricingSettings(gpu_hour_cost=2.0)


def test_throughput_is_measured_over_busy_time_only() -> None:
    tick = Tick()
    meter = ThroughputMeter(window_s=100.0, min_busy_s=10.0, clock=tick)
    assert meter.tokens_per_second() is None
    meter.begin()
    meter.begin()  # two requests share the engine: busy time counts once
    tick.now += 4.0
    meter.end(200)
    tick.now += 6.0
    meter.end(800)
    assert meter.tokens_per_second() == pytest.approx(100.0)  # 1000 tokens over 10 busy seconds
    tick.now += 500.0  # idle: does not dilute the figure
    meter.begin()
    tick.now += 1.0
    meter.end(50)  # this ends the window: its figure is kept for the next one
    assert meter.tokens_per_second() == pytest.approx(1050 / 11)


def test_pricing_follows_the_measured_throughput() -> None:
    tick = Tick()
    meter = ThroughputMeter(window_s=100.0, min_busy_s=1.0, clock=tick)
    pricing = Pricing(PricingSettings(gpu_hour_cost=3.6, tokens_per_second=1000.0), meter)
    meter.begin()
    tick.now += 2.0
    meter.end(4000)  # 2000 tokens/s measured: half the assumed price
    assert pricing.price("m").completion == pytest.approx(0.5)

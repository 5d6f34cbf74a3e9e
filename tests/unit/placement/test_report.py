"""The placement verdicts and reassessment triggers, on synthetic hourly history that exercises each one."""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from appliance.placement.report import Hour, Window, placement_report
from appliance.settings import AlternativePrice, NodeCost, PlacementSettings

NOW = datetime(2026, 12, 1, tzinfo=UTC)
SETTINGS = PlacementSettings(
    alternatives={"cloud-api": AlternativePrice(prompt_per_million=0.1, completion_per_million=0.4)}
)


def history(
    days: int, utilisation: Callable[[int], float], tokens: Callable[[int], int] = lambda _h: 100_000
) -> list[Hour]:
    """One Hour per hour for ``days`` days up to NOW; ``utilisation(i)`` and ``tokens(i)`` of the i-th hour."""
    count = days * 24
    start = NOW - timedelta(hours=count)
    return [Hour(start + timedelta(hours=i), utilisation(i), tokens(i) // 2, tokens(i) // 2, 10) for i in range(count)]


def report(hours: list[Hour], hour_cost: float | None = 2.0, settings: PlacementSettings = SETTINGS) -> dict:
    short = [hour for hour in hours if hour.start >= NOW - timedelta(days=30)]
    long = [hour for hour in hours if hour.start >= NOW - timedelta(days=90)]
    return placement_report(
        Window(30, short, hour_cost), Window(90, long, hour_cost), settings, "engine_busy_fraction", "EUR"
    )


def fired(result: dict) -> set[str]:
    return {trigger["name"] for trigger in result["triggers"] if trigger["fired"]}


def test_steady_high_utilisation_sustained_for_90_days_is_on_prem() -> None:
    result = report(history(95, lambda _h: 0.75, tokens=lambda _h: 10_000_000))
    assert result["verdict"] == "on-prem", result["reason"]
    assert result["windows"]["90d"]["utilisation"]["pattern"] == "steady"
    assert fired(result) == set()


def test_low_utilisation_is_cloud() -> None:
    result = report(history(95, lambda _h: 0.20))
    assert result["verdict"] == "cloud" and "below 40%" in result["reason"]


def test_middle_utilisation_depends_and_names_what_decides() -> None:
    result = report(history(95, lambda _h: 0.50))
    assert result["verdict"] == "depends"
    for variable in ("predictability", "data gravity", "sovereignty"):
        assert variable in result["reason"]


def test_a_burst_that_averages_high_but_spends_half_its_hours_low_is_not_consistent() -> None:
    # Half the hours at 20 %, half at 100 %: a mean of 60 %, but 20 % is what the node reaches in 3 of 4 hours.
    result = report(history(95, lambda h: 0.20 if h % 2 else 1.0))
    util = result["windows"]["90d"]["utilisation"]
    assert util["mean"] == pytest.approx(0.60) and util["consistent"] == pytest.approx(0.20)
    assert util["pattern"] == "burst" and result["verdict"] == "cloud"


def test_high_utilisation_with_too_little_history_is_provisional() -> None:
    result = report(history(40, lambda _h: 0.80))
    assert result["verdict"] == "on-prem-provisional" and "40 of the 90 days" in result["reason"]
    assert "insufficient_history" in fired(result)


def test_a_recent_rise_shifts_the_band() -> None:
    # 65 days at 30 %, then 30 days at 75 %: the long window says cloud, the last 30 days say otherwise.
    hours = history(95, lambda h: 0.30 if h < 65 * 24 else 0.75)
    result = report(hours)
    assert {"utilisation_band_shift"} <= fired(result)


def test_a_change_of_pattern_triggers() -> None:
    hours = history(95, lambda h: 0.70 if h < 65 * 24 else (0.05 if h % 3 else 1.0))
    assert "pattern_change" in fired(report(hours))


def test_utilisation_near_a_threshold_triggers() -> None:
    assert "near_threshold" in fired(report(history(95, lambda _h: 0.62)))


def test_growing_token_volume_triggers() -> None:
    result = report(history(95, lambda _h: 0.75, tokens=lambda h: 50_000 + 2_000 * (h // 24)))
    change = result["windows"]["90d"]["tokens"]["change_per_30_days"]
    assert change > SETTINGS.growth_trigger and "token_volume_trend" in fired(result)


def test_an_alternative_cheaper_than_the_node_triggers_a_cost_inversion() -> None:
    hours = history(95, lambda _h: 0.75, tokens=lambda _h: 1_000)  # a node that costs a lot per token served
    result = report(hours, hour_cost=10.0)
    cost = result["windows"]["90d"]["cost"]
    assert cost["on_prem_per_million"] == pytest.approx(10.0 / 1_000 * 1e6)
    assert cost["cheapest_alternative"] == "cloud-api" and cost["on_prem_over_cheapest"] > 1
    assert "cost_inversion" in fired(result)
    cheap = report(history(95, lambda _h: 0.75, tokens=lambda _h: 10_000_000), hour_cost=1.0)
    assert "cost_inversion" not in fired(cheap)


def test_no_telemetry_is_said_not_guessed() -> None:
    assert report([])["verdict"] == "no-data"


def test_the_node_cost_spreads_purchase_power_and_operations_over_hours() -> None:
    node = NodeCost(
        hardware_price=87_600, amortisation_months=36, power_watts=2_000, power_price_per_kwh=0.25,
        operations_per_month=730,
    )  # fmt: skip
    assert node.hourly == pytest.approx(87_600 / (36 * 730) + 0.5 + 1.0)

"""The placement verdict: is this workload cheapest on the owned node, or elsewhere? Pure functions over hourly
figures, so every verdict and trigger can be exercised with synthetic history.

The rule (stated with its variables in every report):
- utilisation is the node's accelerator utilisation per hour (GPU utilisation where ``nvidia-smi`` reports it;
  else the busiest engine's busy fraction: the share of the hour with a request running);
- **consistent** utilisation is the level reached in at least ``consistent_share`` (75 %) of observed hours,
  so a burst pattern that averages 70 % but spends half its hours at 20 % counts as 20 %, not 70 %;
- below ``low_utilisation`` (40 %) consistent: another placement is cheaper ("cloud");
- between 40 and 60 %: it depends on predictability, data gravity and sovereignty ("depends");
- at or above ``high_utilisation`` (60 %) sustained for ``sustained_days`` (90) or more: owned hardware wins
  ("on-prem"); with less history than that it is "on-prem-provisional".
Reassessment triggers name what would change the verdict, with the value now and the threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from appliance.settings import AlternativePrice, PlacementSettings

Verdict = str  # "cloud" | "depends" | "on-prem" | "on-prem-provisional" | "no-data"


@dataclass(frozen=True, slots=True)
class Hour:
    """One observed hour of the node: its utilisation (0..1) and what its engines processed."""

    start: datetime
    utilisation: float
    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests: int = 0


@dataclass
class Window:
    days: int
    hours: list[Hour]
    hour_cost: float | None = None  # the node's cost per hour (owned: it accrues whether busy or not)
    mix: dict[str, dict[str, int]] = field(default_factory=dict)  # endpoint -> {requests, tokens}
    retrieval: dict[str, int] = field(default_factory=dict)  # {requests, injected_tokens, chunks}
    end: datetime | None = None  # the window's end (now): the node is charged from its first observed hour to it


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def utilisation_figures(hours: list[Hour], settings: PlacementSettings) -> dict[str, Any]:
    values = [hour.utilisation for hour in hours]
    if not values:
        return {"observed_hours": 0}
    mean = sum(values) / len(values)
    deviation = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    cv = deviation / mean if mean > 0 else 0.0
    consistent = percentile(values, 1.0 - settings.consistent_share)
    if cv <= 0.3:
        pattern = "steady"
    elif cv > 0.5 or consistent < 0.5 * mean:
        pattern = "burst"
    else:
        pattern = "variable"
    return {
        "observed_hours": len(values),
        "mean": round(mean, 4),
        "consistent": round(consistent, 4),
        "share_at_or_above_low": round(sum(v >= settings.low_utilisation for v in values) / len(values), 4),
        "share_at_or_above_high": round(sum(v >= settings.high_utilisation for v in values) / len(values), 4),
        "coefficient_of_variation": round(cv, 4),
        "pattern": pattern,
    }


def token_trend(hours: list[Hour]) -> dict[str, Any]:
    """Token volume per day and its linear trend, as a relative change per 30 days of the mean daily volume."""
    daily: dict[str, int] = {}
    for hour in hours:
        day = hour.start.date().isoformat()
        daily[day] = daily.get(day, 0) + hour.prompt_tokens + hour.generation_tokens
    days = sorted(daily)
    total = sum(daily.values())
    result: dict[str, Any] = {"total": total, "days": len(days), "per_day": [[d, daily[d]] for d in days]}
    if len(days) < 7:
        result["change_per_30_days"] = None
        return result
    origin = datetime.fromisoformat(days[0])
    xs = [(datetime.fromisoformat(d) - origin).days for d in days]
    ys = [daily[d] for d in days]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
    result["change_per_30_days"] = round(slope * 30 / mean_y, 4) if mean_y > 0 else None
    return result


def cost_figures(window: Window, alternatives: dict[str, AlternativePrice]) -> dict[str, Any]:
    prompt = sum(hour.prompt_tokens for hour in window.hours)
    generated = sum(hour.generation_tokens for hour in window.hours)
    tokens = prompt + generated
    figures: dict[str, Any] = {"prompt_tokens": prompt, "generation_tokens": generated, "on_prem_per_million": None}
    if window.hour_cost is not None and tokens > 0:
        # The node costs money in every hour of the window it existed, busy or not, but not before it was
        # observed: a node watched for a week is not charged the 90 days of the long window.
        hours = window.days * 24.0
        if window.hours:
            first = min(h.start for h in window.hours)
            last = window.end or max(h.start for h in window.hours) + timedelta(hours=1)
            hours = min(hours, max(1.0, (last - first).total_seconds() / 3600))
        node_cost = window.hour_cost * hours
        figures["node_cost"] = round(node_cost, 2)
        figures["node_cost_hours"] = round(hours, 1)
        figures["on_prem_per_million"] = round(node_cost / tokens * 1e6, 4)
    priced = {}
    for name, price in sorted(alternatives.items()):
        if tokens == 0:
            continue
        cost = (prompt * price.prompt_per_million + generated * price.completion_per_million) / 1e6
        priced[name] = {"cost": round(cost, 2), "per_million": round(cost / tokens * 1e6, 4)}
    figures["alternatives"] = priced
    if priced and figures["on_prem_per_million"] is not None:
        cheapest = min(priced, key=lambda name: priced[name]["per_million"])
        figures["cheapest_alternative"] = cheapest
        figures["on_prem_over_cheapest"] = round(figures["on_prem_per_million"] / priced[cheapest]["per_million"], 4)
    return figures


def band(consistent: float, settings: PlacementSettings) -> str:
    if consistent < settings.low_utilisation:
        return "low"
    return "middle" if consistent < settings.high_utilisation else "high"


def verdict(figures: dict[str, Any], observed_days: float, settings: PlacementSettings) -> tuple[Verdict, str]:
    if not figures.get("observed_hours"):
        return "no-data", "no engine telemetry in the window"
    consistent = figures["consistent"]
    level = band(consistent, settings)
    share = f"{settings.consistent_share:.0%} of hours"
    if level == "low":
        return "cloud", (
            f"consistent utilisation {consistent:.0%} (reached in {share}) is below {settings.low_utilisation:.0%}: "
            "another placement is cheaper, unless sovereignty rules it out"
        )
    if level == "middle":
        return "depends", (
            f"consistent utilisation {consistent:.0%} is between {settings.low_utilisation:.0%} and "
            f"{settings.high_utilisation:.0%}: decided by predictability (pattern {figures['pattern']}), "
            "data gravity (retrieval kept next to the model) and sovereignty"
        )
    if observed_days >= settings.sustained_days:
        return "on-prem", (
            f"consistent utilisation {consistent:.0%} at or above {settings.high_utilisation:.0%}, sustained over "
            f"{observed_days:.0f} days (>= {settings.sustained_days}): owned hardware wins"
        )
    return "on-prem-provisional", (
        f"consistent utilisation {consistent:.0%} at or above {settings.high_utilisation:.0%}, but observed for "
        f"{observed_days:.0f} of the {settings.sustained_days} days the rule asks for"
    )


def triggers(
    short: dict[str, Any],
    long: dict[str, Any],
    baseline: dict[str, Any],
    observed_days: float,
    settings: PlacementSettings,
) -> list[dict[str, Any]]:
    """What would change the verdict: each with its value now, its threshold and whether it fired. The recent
    window is compared with the baseline before it (the long window's hours that precede the short one)."""
    found: list[dict[str, Any]] = []
    util_short, util_long, util_before = short["utilisation"], long["utilisation"], baseline
    if util_short.get("observed_hours") and util_before.get("observed_hours"):
        now, before = band(util_short["consistent"], settings), band(util_before["consistent"], settings)
        found.append(
            {
                "name": "utilisation_band_shift",
                "description": "the recent window's consistent utilisation is in another band than the baseline's",
                "value": util_short["consistent"],
                "threshold": [settings.low_utilisation, settings.high_utilisation],
                "fired": now != before,
            }
        )
        found.append(
            {
                "name": "pattern_change",
                "description": "the load pattern changed (steady, variable, burst)",
                "value": util_short["pattern"],
                "threshold": util_before["pattern"],
                "fired": util_short["pattern"] != util_before["pattern"],
            }
        )
    if util_long.get("observed_hours"):
        margin = min(abs(util_long["consistent"] - t) for t in (settings.low_utilisation, settings.high_utilisation))
        found.append(
            {
                "name": "near_threshold",
                "description": "consistent utilisation within 5 points of a threshold: a small change flips it",
                "value": round(margin, 4),
                "threshold": 0.05,
                "fired": margin < 0.05,
            }
        )
    change = long["tokens"].get("change_per_30_days")
    found.append(
        {
            "name": "token_volume_trend",
            "description": f"token volume changing by more than {settings.growth_trigger:.0%} per 30 days",
            "value": change,
            "threshold": settings.growth_trigger,
            "fired": change is not None and abs(change) > settings.growth_trigger,
        }
    )
    ratio = long["cost"].get("on_prem_over_cheapest")
    found.append(
        {
            "name": "cost_inversion",
            "description": "the cheapest alternative costs less per million tokens than the node",
            "value": ratio,
            "threshold": 1.0,
            "fired": ratio is not None and ratio > 1.0,
        }
    )
    found.append(
        {
            "name": "insufficient_history",
            "description": f"less than {settings.sustained_days} days of telemetry: the verdict is provisional",
            "value": round(observed_days, 1),
            "threshold": settings.sustained_days,
            "fired": observed_days < settings.sustained_days,
        }
    )
    return found


def utilisation_per_day(hours: list[Hour]) -> list[list[Any]]:
    """[day, mean utilisation of its observed hours] for the console's chart."""
    days: dict[str, list[float]] = {}
    for hour in hours:
        days.setdefault(hour.start.date().isoformat(), []).append(hour.utilisation)
    return [[day, round(sum(values) / len(values), 4)] for day, values in sorted(days.items())]


def window_figures(window: Window, settings: PlacementSettings) -> dict[str, Any]:
    return {
        "days": window.days,
        "utilisation": utilisation_figures(window.hours, settings),
        "utilisation_per_day": utilisation_per_day(window.hours),
        "tokens": token_trend(window.hours),
        "requests": sum(hour.requests for hour in window.hours),
        "mix": window.mix,
        "retrieval_kept_local": window.retrieval,
        "cost": cost_figures(window, settings.alternatives),
    }


def placement_report(
    short: Window, long: Window, settings: PlacementSettings, utilisation_source: str, currency: str
) -> dict[str, Any]:
    """The report over a short (30-day) and a long (90-day) window ending now."""
    figures_short, figures_long = window_figures(short, settings), window_figures(long, settings)
    first = min((hour.start for hour in long.hours), default=None)
    last = max((hour.start for hour in long.hours), default=None)
    observed_days = (last - first).total_seconds() / 86400 + 1 / 24 if first and last else 0.0
    decided, why = verdict(figures_long["utilisation"], observed_days, settings)
    recent_start = min((hour.start for hour in short.hours), default=None)
    before = [hour for hour in long.hours if recent_start is None or hour.start < recent_start]
    baseline = utilisation_figures(before, settings)
    return {
        "verdict": decided,
        "reason": why,
        "utilisation_source": utilisation_source,
        "currency": currency,
        "observed_days": round(observed_days, 1),
        "thresholds": {
            "low_utilisation": settings.low_utilisation,
            "high_utilisation": settings.high_utilisation,
            "sustained_days": settings.sustained_days,
            "consistent_share": settings.consistent_share,
        },
        "windows": {f"{short.days}d": figures_short, f"{long.days}d": figures_long},
        "baseline_utilisation": baseline,
        "triggers": triggers(figures_short, figures_long, baseline, observed_days, settings),
    }

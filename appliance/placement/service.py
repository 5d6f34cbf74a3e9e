"""The placement report from the node's own database (used by the admin API and the CLI)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from appliance.placement.history import report_inputs
from appliance.placement.report import placement_report
from appliance.settings import Settings


def build_report(engine: Engine, settings: Settings, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    inputs = report_inputs(engine, now, settings.pricing.hour_cost)
    report = placement_report(
        inputs["short"], inputs["long"], settings.placement, inputs["utilisation_source"], settings.pricing.currency
    )
    report["generated_at"] = now.isoformat()
    report["hour_cost"] = settings.pricing.hour_cost
    return report


def render(report: dict[str, Any]) -> str:
    """The report as text for `appliance placement report`."""
    lines = [f"placement verdict: {report['verdict'].upper()}", f"  {report['reason']}"]
    lines.append(f"  utilisation from {report['utilisation_source']}, {report['observed_days']} days observed")
    for name, figures in report["windows"].items():
        util = figures["utilisation"]
        cost = figures["cost"]
        lines.append(f"  {name}:")
        if util.get("observed_hours"):
            lines.append(
                f"    utilisation mean {util['mean']:.0%}, consistent {util['consistent']:.0%}, "
                f"pattern {util['pattern']} (CV {util['coefficient_of_variation']:.2f}), "
                f"hours >= high {util['share_at_or_above_high']:.0%}"
            )
        change = figures["tokens"].get("change_per_30_days")
        trend = f", trend {change:+.0%}/30d" if change is not None else ""
        lines.append(f"    tokens {figures['tokens']['total']:,}{trend}, requests {figures['requests']:,}")
        if cost.get("on_prem_per_million") is not None:
            lines.append(f"    on-prem {cost['on_prem_per_million']:.4f} {report['currency']} per 1M tokens")
        for alternative, price in cost.get("alternatives", {}).items():
            lines.append(f"    {alternative}: {price['per_million']:.4f} per 1M tokens")
    fired = [t for t in report["triggers"] if t["fired"]]
    lines.append("  reassessment triggers fired: " + (", ".join(t["name"] for t in fired) or "none"))
    return "\n".join(lines)

"""Drift findings: each workflow, agent and model's recent window (the last hour or day) against its baseline
(the ``baseline_days`` before that window), every signal of :mod:`appliance.drift.signals`."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from appliance.drift.signals import DISTRIBUTIONS, RATES, Request, compare
from appliance.ledger.models import UsageRecord

WINDOWS = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
SCOPES = ("workflow_id", "agent_id", "model")


def _request(row: UsageRecord) -> Request:
    return Request(
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        latency_ms=row.latency_ms,
        ttft_ms=row.ttft_ms,
        depth=row.depth,
        injected_tokens=row.injected_tokens,
        retry=row.retry_attempt > 0,
        status_code=row.status_code,
        finish_reason=row.finish_reason,
        context_length=row.context_length,
    )


def _grouped(rows: list[UsageRecord]) -> dict[tuple[str, str], list[Request]]:
    groups: dict[tuple[str, str], list[Request]] = defaultdict(list)
    for row in rows:
        request = _request(row)
        for scope in SCOPES:
            ident = getattr(row, scope)
            if ident:
                groups[(scope.removesuffix("_id"), ident)].append(request)
    return groups


def drift_report(
    engine: Engine,
    *,
    window: str = "day",
    baseline_days: int = 7,
    min_samples: int = 30,
    max_rows: int = 200_000,
    tenant_id: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Every group's comparisons and the findings among them (a principal bound to a tenant sees only its own)."""
    now = now or datetime.now(UTC)
    recent_start = now - WINDOWS[window]
    baseline_start = recent_start - timedelta(days=baseline_days)
    query = select(UsageRecord).where(col(UsageRecord.created_at) >= baseline_start, col(UsageRecord.created_at) < now)
    if tenant_id is not None:
        query = query.where(UsageRecord.tenant_id == tenant_id)
    # The newest rows first, at most max_rows: on a busy node the baseline is its most recent part.
    query = query.order_by(col(UsageRecord.created_at).desc()).limit(max_rows)
    with Session(engine) as session:
        rows = list(session.exec(query).all())

    def at(row: UsageRecord) -> datetime:
        created = row.created_at
        return created if created.tzinfo else created.replace(tzinfo=UTC)

    baseline = _grouped([row for row in rows if at(row) < recent_start])
    recent = _grouped([row for row in rows if at(row) >= recent_start])
    groups = []
    findings = []
    for key in sorted(set(baseline) & set(recent)):
        comparisons = [
            result
            for signal in (*DISTRIBUTIONS, *RATES)
            if (result := compare(signal, baseline[key], recent[key], min_samples)) is not None
        ]
        scope, ident = key
        groups.append({"scope": scope, "id": ident, "comparisons": comparisons})
        for result in comparisons:
            if result["finding"]:
                findings.append({"scope": scope, "id": ident, **result, "summary": _summary(scope, ident, result)})
    return {
        "window": window,
        "rows_read": len(rows),
        "recent": [recent_start.isoformat(), now.isoformat()],
        "baseline": [baseline_start.isoformat(), recent_start.isoformat()],
        "min_samples": min_samples,
        "findings": findings,
        "groups": groups,
    }


def _summary(scope: str, ident: str, result: dict[str, Any]) -> str:
    signal = result["signal"]
    if "median_change" in result:
        return (
            f"{scope} {ident}: {signal} median {result['baseline']:g} -> {result['recent']:g} "
            f"({result['median_change']:+.0%}; PSI {result['statistic']:.2f} >= {result['threshold']})"
        )
    return (
        f"{scope} {ident}: {signal} {result['baseline']:.1%} -> {result['recent']:.1%} "
        f"(z {result['statistic']:+.1f}, |z| >= {result['threshold']:g})"
    )

"""Usage and cost reports from the ledger: per tenant, workflow, agent, model or key, over a period,
optionally in hourly or daily buckets (boundaries in the budgets' time zone), as rows or CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Table, select
from sqlalchemy.engine import Engine

from appliance.ledger.models import UsageRecord
from appliance.ledger.pricing import to_currency
from appliance.lib.stats import nearest_rank
from appliance.lib.windows import window

USAGE: Table = UsageRecord.__table__  # type: ignore[attr-defined]
GROUPS = {
    "tenant": USAGE.c.tenant_id,
    "workflow": USAGE.c.workflow_id,
    "agent": USAGE.c.agent_id,
    "model": USAGE.c.model,
    "key": USAGE.c.api_key_id,
}
COLUMNS = (
    "group",
    "bucket",
    "requests",
    "served",
    "refused",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "retries",
    "retry_rate",
    "latency_p50_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p99_ms",
)
RECORD_COLUMNS = (
    "request_id",
    "created_at",
    "model",
    "endpoint",
    "tenant_id",
    "workflow_id",
    "agent_id",
    "api_key_id",
    "subject",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "ttft_ms",
    "latency_ms",
    "status_code",
    "error_code",
    "budget_id",
    "retry_attempt",
    "depth",
    "streamed",
    "client_disconnected",
)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when there are none."""
    return percentiles(values, q)[q]


def percentiles(values: list[float], *qs: float) -> dict[float, float | None]:
    """Several nearest-rank percentiles (q in 0..100), sorting the values once; None when there are none."""
    if not values:
        return dict.fromkeys(qs)
    return {q: round(value, 3) for q, value in zip(qs, nearest_rank(values, *(q / 100.0 for q in qs)), strict=True)}


@dataclass
class _Group:
    requests: int = 0
    served: int = 0
    refused: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_micros: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    def add(self, row: Any) -> None:
        self.requests += 1
        status = row.status_code
        if status == 200:
            self.served += 1
            self.latencies.append(row.latency_ms)
            if row.ttft_ms is not None:
                self.ttfts.append(row.ttft_ms)
        elif status == 429:
            self.refused += 1
        elif status >= 400 and not row.client_disconnected:
            self.errors += 1
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.total_tokens += row.total_tokens
        self.cost_micros += row.cost_micros
        self.retries += int(row.retry_attempt > 0)

    def as_row(self, group: str | None, bucket: datetime | None) -> dict[str, Any]:
        latency, ttft = percentiles(self.latencies, 50, 99), percentiles(self.ttfts, 50, 99)
        return {
            "group": group,
            "bucket": bucket.isoformat() if bucket else None,
            "requests": self.requests,
            "served": self.served,
            "refused": self.refused,
            "errors": self.errors,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": to_currency(self.cost_micros),
            "retries": self.retries,
            "retry_rate": round(self.retries / self.requests, 4) if self.requests else 0.0,
            "latency_p50_ms": latency[50],
            "latency_p99_ms": latency[99],
            "ttft_p50_ms": ttft[50],
            "ttft_p99_ms": ttft[99],
        }


def usage_report(
    engine: Engine,
    *,
    group_by: str,
    start: datetime,
    end: datetime,
    zone: ZoneInfo,
    bucket: str | None = None,
    tenant_id: str | None = None,
) -> list[dict[str, Any]]:
    """One row per group (and bucket), ordered by bucket then by cost and tokens, highest first."""
    column = GROUPS[group_by]
    query = select(
        column.label("group"),
        USAGE.c.created_at,
        USAGE.c.status_code,
        USAGE.c.client_disconnected,
        USAGE.c.prompt_tokens,
        USAGE.c.completion_tokens,
        USAGE.c.total_tokens,
        USAGE.c.cost_micros,
        USAGE.c.retry_attempt,
        USAGE.c.latency_ms,
        USAGE.c.ttft_ms,
    ).where(USAGE.c.created_at >= start, USAGE.c.created_at < end)
    if tenant_id is not None:
        query = query.where(USAGE.c.tenant_id == tenant_id)
    groups: dict[tuple[str | None, datetime | None], _Group] = {}
    with engine.connect() as connection:
        for row in connection.execution_options(yield_per=5000).execute(query):
            key = (row.group, window(bucket, row.created_at, zone)[0] if bucket else None)
            groups.setdefault(key, _Group()).add(row)
    rows = [totals.as_row(group, moment) for (group, moment), totals in groups.items()]
    rows.sort(key=lambda r: (r["bucket"] or "", -r["cost"], -r["total_tokens"], r["group"] or ""))
    return rows


def usage_records(
    engine: Engine, *, start: datetime, end: datetime, tenant_id: str | None = None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """Single requests, newest first, with what each cost."""
    query = select(USAGE).where(USAGE.c.created_at >= start, USAGE.c.created_at < end)
    if tenant_id is not None:
        query = query.where(USAGE.c.tenant_id == tenant_id)
    query = query.order_by(USAGE.c.created_at.desc(), USAGE.c.id.desc()).limit(limit).offset(offset)
    with engine.connect() as connection:
        out = []
        for row in connection.execute(query).mappings():
            item = {name: row[name] for name in RECORD_COLUMNS if name in row}
            item["created_at"] = row["created_at"].isoformat()
            item["cost"] = to_currency(row["cost_micros"])
            out.append(item)
        return out


def to_csv(rows: Iterable[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """Spreadsheet formula injection: a text cell that starts like a formula is quoted as text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@"):
        return "'" + value
    return value

"""The node's history as the placement report reads it: hourly utilisation and tokens from the engines' per-minute
roll-ups, the request mix and the retrieval traffic from the usage ledger."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from appliance.ledger.models import UsageRecord
from appliance.placement.report import Hour, Window
from appliance.telemetry.models import EngineRollup


def _busy(row: EngineRollup) -> float:
    # Rows written before migration 0009 have no busy fraction: requests running on average, capped at 1.
    return row.busy_fraction if row.busy_fraction is not None else min(1.0, row.running_avg)


def hourly(engine: Engine, since: datetime, until: datetime) -> tuple[list[Hour], str]:
    """(one Hour per observed hour, where utilisation came from). Several gateway processes scrape the same
    engine: their rows of one minute are averaged (utilisation) or the largest taken (tokens). The node's
    utilisation in an hour is its GPU utilisation where measured, else the busiest engine's busy fraction."""
    with Session(engine) as session:
        rows = session.exec(
            select(EngineRollup).where(col(EngineRollup.minute) >= since, col(EngineRollup.minute) < until)
        ).all()
    minutes: dict[tuple[str, datetime], list[EngineRollup]] = defaultdict(list)
    for row in rows:
        minutes[(row.engine, row.minute)].append(row)
    busy: dict[tuple[datetime, str], list[float]] = defaultdict(list)
    gpu: dict[datetime, list[float]] = defaultdict(list)
    tokens: dict[datetime, list[int]] = defaultdict(lambda: [0, 0, 0])
    for (engine_name, minute), same in minutes.items():
        hour = minute.replace(minute=0, second=0, microsecond=0)
        busy[(hour, engine_name)].append(sum(_busy(r) for r in same) / len(same))
        gpu[hour].extend(r.gpu_utilization for r in same if r.gpu_utilization is not None)
        totals = tokens[hour]
        totals[0] += max(r.prompt_tokens for r in same)
        totals[1] += max(r.generation_tokens for r in same)
        totals[2] += sum(r.requests for r in same)  # each gateway counts the requests it finished itself
    per_hour: dict[datetime, float] = {}
    for (hour, _engine), values in busy.items():
        per_hour[hour] = max(per_hour.get(hour, 0.0), sum(values) / len(values))
    source = "gpu" if any(gpu.values()) else "engine_busy_fraction"
    hours = []
    for hour in sorted(per_hour):
        readings = gpu.get(hour)
        utilisation = sum(readings) / len(readings) if source == "gpu" and readings else per_hour[hour]
        prompt, generated, requests = tokens[hour]
        hours.append(Hour(hour, utilisation, prompt, generated, requests))
    return hours, source


def traffic(engine: Engine, since: datetime, until: datetime) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(request mix by endpoint, retrieval traffic kept on the node) from the usage ledger."""
    period = (col(UsageRecord.created_at) >= since, col(UsageRecord.created_at) < until)
    with Session(engine) as session:
        mix_rows = session.exec(
            select(UsageRecord.endpoint, func.count(), func.coalesce(func.sum(UsageRecord.total_tokens), 0))
            .where(*period)
            .group_by(UsageRecord.endpoint)
        ).all()
        retrieval = session.exec(
            select(
                func.count(),
                func.coalesce(func.sum(UsageRecord.injected_tokens), 0),
                func.coalesce(func.sum(UsageRecord.chunks_injected), 0),
            ).where(*period, col(UsageRecord.endpoint).startswith("/v1/rag"))
        ).one()
    mix = {endpoint: {"requests": int(count), "tokens": int(total)} for endpoint, count, total in mix_rows}
    requests, injected, chunks = retrieval
    return mix, {"requests": int(requests), "injected_tokens": int(injected), "chunks": int(chunks)}


def window(engine: Engine, days: int, now: datetime, hour_cost: float | None) -> tuple[Window, str]:
    since = now - timedelta(days=days)
    hours, source = hourly(engine, since, now)
    mix, retrieval = traffic(engine, since, now)
    return Window(days, hours, hour_cost, mix, retrieval, end=now), source


def report_inputs(engine: Engine, now: datetime, hour_cost: float | None) -> dict[str, Any]:
    short, _ = window(engine, 30, now, hour_cost)
    long, source = window(engine, 90, now, hour_cost)
    return {"short": short, "long": long, "utilisation_source": source}

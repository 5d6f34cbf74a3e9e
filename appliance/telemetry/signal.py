"""The concurrency health signal: healthy, degrading or collapsing, with the reasons.

GPU (or CPU) utilisation says nothing about whether requests are being served well: an engine at full
batch can be collapsing for its interactive users. The signal reads four inputs together over a rolling
window, each judged against configured thresholds:

- queue-depth trend: the least-squares slope of the engine's waiting requests (requests per second), or a
  queue that never emptied during the window;
- slot utilisation variance: how much the number of running requests swings (coefficient of variation)
  while requests wait: churn from preemption or long prefills;
- KV-cache pressure: the cache's usage, and preemptions in the window (the cache ran out);
- TTFT divergence: P99 over P50 time to first token, measured at the gateway (or, with too few streamed
  requests, from the engine's own histogram over the window).

Each input that crosses its threshold is a reason. The state is the worst level among them; three or more
inputs degrading at once is collapsing: they feed each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.lib.stats import nearest_rank
from appliance.settings import TelemetrySettings
from appliance.telemetry.samples import EngineSample, histogram_quantile

HEALTHY, DEGRADING, COLLAPSING = "healthy", "degrading", "collapsing"
LEVELS = (HEALTHY, DEGRADING, COLLAPSING)


@dataclass
class Health:
    state: str = HEALTHY
    reasons: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reasons": self.reasons, "inputs": self.inputs}


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y) points; 0 with fewer than two distinct times."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / spread


def _ttft(samples: Sequence[EngineSample], gateway_ttfts: Sequence[float], minimum: int) -> tuple[float, float, str]:
    """(P50, P99, source) of time to first token in the window, in seconds; zeros when too little is known."""
    if len(gateway_ttfts) >= minimum:
        median, tail = nearest_rank(gateway_ttfts, 0.5, 0.99)
        return median, tail, "gateway"
    if len(samples) >= 2:
        first, last = samples[0].ttft_buckets, samples[-1].ttft_buckets
        delta = {bound: last[bound] - first.get(bound, 0.0) for bound in last}
        if delta and max(delta.values()) >= minimum:
            p50, p99 = histogram_quantile(0.5, delta), histogram_quantile(0.99, delta)
            if p50 is not None and p99 is not None:
                return p50, p99, "engine"
    return 0.0, 0.0, "none"


def assess(samples: Sequence[EngineSample], gateway_ttfts: Sequence[float], settings: TelemetrySettings) -> Health:
    health = Health()
    if not samples:
        health.state = HEALTHY
        health.reasons.append("no readings yet")
        return health
    levels: list[int] = []

    def judge(level: int, reason: str) -> None:
        levels.append(level)
        health.reasons.append(f"{LEVELS[level]}: {reason}")

    latest = samples[-1]
    trend = slope([(s.at, s.waiting) for s in samples])
    threshold = settings.queue_growth_per_s
    if trend >= 4 * threshold:
        judge(2, f"queue growing {trend:.2f} requests/s (now {latest.waiting:g} waiting)")
    elif trend >= threshold:
        judge(1, f"queue growing {trend:.2f} requests/s (now {latest.waiting:g} waiting)")
    elif len(samples) >= 3 and min(s.waiting for s in samples) > 0:
        judge(1, f"requests waited through the whole window (now {latest.waiting:g} waiting)")

    running = [s.running for s in samples]
    mean = sum(running) / len(running)
    cv = math.sqrt(sum((r - mean) ** 2 for r in running) / len(running)) / mean if mean > 0 else 0.0
    queued = any(s.waiting > 0 for s in samples)
    if queued and cv >= settings.slot_cv_degrading:
        judge(1, f"running requests swing (variation {cv:.2f}) while requests wait")

    kv = latest.kv_cache_usage
    preempted = latest.preemptions - samples[0].preemptions
    if kv >= settings.kv_collapsing:
        judge(2, f"KV cache {kv:.0%} full")
    elif kv >= settings.kv_degrading or preempted > 0:
        judge(1, f"KV cache {kv:.0%} full, {preempted:g} preemptions in the window")

    p50, p99, source = _ttft(samples, gateway_ttfts, settings.min_ttft_samples)
    divergence = p99 / p50 if p50 > 0 else 0.0
    if divergence >= settings.ttft_divergence_collapsing:
        judge(2, f"TTFT P99 is {divergence:.1f}x P50 ({p99 * 1000:.0f} ms vs {p50 * 1000:.0f} ms)")
    elif divergence >= settings.ttft_divergence_degrading:
        judge(1, f"TTFT P99 is {divergence:.1f}x P50 ({p99 * 1000:.0f} ms vs {p50 * 1000:.0f} ms)")

    worst = max(levels, default=0)
    if levels.count(1) + levels.count(2) >= 3:
        worst = 2
    health.state = LEVELS[worst]
    health.inputs = {
        "queue_depth": latest.waiting,
        "queue_trend_per_s": round(trend, 4),
        "running": latest.running,
        "running_variation": round(cv, 4),
        "kv_cache_usage": round(kv, 4),
        "preemptions_in_window": preempted,
        "ttft_p50_ms": round(p50 * 1000, 2),
        "ttft_p99_ms": round(p99 * 1000, 2),
        "ttft_divergence": round(divergence, 2),
        "ttft_source": source,
        "samples": len(samples),
    }
    return health


def worst(states: Sequence[str]) -> str:
    return max(states, key=LEVELS.index, default=HEALTHY)

"""Behavioural drift: per workflow, agent and model, how requests behave now against how they behaved before.

Signals (from the usage ledger, one value per request):
- distributions: ``prompt_tokens``, ``completion_tokens`` (answer length), ``latency_ms``, ``ttft_ms``, ``depth``
  (loop depth), ``injected_tokens`` (retrieval inflation), ``context_utilisation`` (prompt and completion tokens
  over the serving engine's context length, for answered requests whose row records that length);
- rates: ``retry_rate`` (share of requests that are a retry), ``refusal_rate`` (share refused with 4xx: budgets,
  limits), ``error_rate`` (5xx), ``truncation_rate`` (share of generations cut off by their output cap: finish
  reason `length`, among requests the engine finished).

Tests, stated so a finding carries its evidence:
- a distribution drifts when its **population stability index** (PSI) over ten bins fixed at the baseline's
  deciles is >= 0.25 (the usual "major shift" threshold; 0.1-0.25 is reported as a "moderate" value, not a
  finding) and the median moved by at least 20 %;
- a rate drifts when a **two-proportion z-test** gives |z| >= 3 and the rate changed by at least half of the
  baseline's (or by 5 points from a zero baseline).
Both need at least ``min_samples`` requests in each window. Pure functions: see :mod:`appliance.drift.report`.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

DISTRIBUTIONS = (
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "depth",
    "injected_tokens",
    "context_utilisation",
)
RATES = ("retry_rate", "refusal_rate", "error_rate", "truncation_rate")
PSI_FINDING, PSI_MODERATE = 0.25, 0.10
Z_FINDING = 3.0
MIN_MEDIAN_CHANGE = 0.20


@dataclass(frozen=True, slots=True)
class Request:
    """What drift reads of one usage row."""

    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    ttft_ms: float | None
    depth: int
    injected_tokens: int
    retry: bool
    status_code: int
    finish_reason: str | None = None
    context_length: int | None = None

    def value(self, signal: str) -> float | None:
        if signal == "context_utilisation":
            if not self.context_length or self.status_code != 200:
                return None
            return (self.prompt_tokens + self.completion_tokens) / self.context_length
        if signal == "retry_rate":
            return float(self.retry)
        if signal == "refusal_rate":
            return float(400 <= self.status_code < 500)
        if signal == "error_rate":
            return float(self.status_code >= 500)
        if signal == "truncation_rate":
            return None if self.finish_reason is None else float(self.finish_reason == "length")
        value = getattr(self, signal)
        return None if value is None else float(value)


def _edges(baseline: list[float], bins: int = 10) -> list[float]:
    ordered = sorted(baseline)
    edges: list[float] = []
    for index in range(1, bins):
        edge = ordered[min(len(ordered) - 1, math.ceil(index / bins * len(ordered)) - 1)]
        if not edges or edge > edges[-1]:
            edges.append(edge)
    return edges


def psi(baseline: list[float], recent: list[float], bins: int = 10) -> float:
    """Population stability index of ``recent`` against ``baseline``, bins at the baseline's quantiles (values
    equal to an edge fall in the bin below it; empty bins count as half an observation)."""
    edges = _edges(baseline, bins)
    slots = len(edges) + 1

    def shares(values: list[float]) -> list[float]:
        counts = [0] * slots
        for value in values:
            counts[bisect_left(edges, value)] += 1  # value <= edge i falls in bin i
        return [max(count, 0.5) / len(values) for count in counts]

    before, after = shares(baseline), shares(recent)
    return sum((a - b) * math.log(a / b) for a, b in zip(after, before, strict=True))


def _rounded(value: float) -> float:
    """Three decimals, or three significant digits below 1 (a context utilisation of 0.00723 stays readable)."""
    return round(value, 3) if abs(value) >= 1 or value == 0 else float(f"{value:.3g}")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def z_two_proportions(hits_a: int, n_a: int, hits_b: int, n_b: int) -> float:
    pooled = (hits_a + hits_b) / (n_a + n_b)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if spread == 0:
        return 0.0
    return (hits_b / n_b - hits_a / n_a) / spread


def compare(signal: str, baseline: list[Request], recent: list[Request], min_samples: int) -> dict[str, Any] | None:
    """The comparison of one signal, with its test and whether it is a finding; None without enough data."""
    before = [v for r in baseline if (v := r.value(signal)) is not None]
    after = [v for r in recent if (v := r.value(signal)) is not None]
    if len(before) < min_samples or len(after) < min_samples:
        return None
    if signal in RATES:
        rate_before, rate_after = sum(before) / len(before), sum(after) / len(after)
        z = z_two_proportions(int(sum(before)), len(before), int(sum(after)), len(after))
        moved = abs(rate_after - rate_before) >= (0.5 * rate_before if rate_before > 0 else 0.05)
        return {
            "signal": signal,
            "test": "two-proportion z",
            "statistic": round(z, 3),
            "threshold": Z_FINDING,
            "baseline": round(rate_before, 4),
            "recent": round(rate_after, 4),
            "samples": [len(before), len(after)],
            "finding": abs(z) >= Z_FINDING and moved,
        }
    index = psi(before, after)
    median_before, median_after = median(before), median(after)
    change = (median_after - median_before) / median_before if median_before else (1.0 if median_after else 0.0)
    return {
        "signal": signal,
        "test": "population stability index",
        "statistic": round(index, 4),
        "threshold": PSI_FINDING,
        "level": "major" if index >= PSI_FINDING else ("moderate" if index >= PSI_MODERATE else "stable"),
        "baseline": _rounded(median_before),
        "recent": _rounded(median_after),
        "median_change": round(change, 4),
        "samples": [len(before), len(after)],
        "finding": index >= PSI_FINDING and abs(change) >= MIN_MEDIAN_CHANGE,
    }

"""One reading of a vLLM engine's Prometheus metrics, reduced to what the health signal needs."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class EngineSample:
    at: float  # monotonic seconds
    running: float = 0.0  # requests being processed (holding a slot)
    waiting: float = 0.0  # requests queued in the engine
    kv_cache_usage: float = 0.0  # 0..1
    preemptions: float = 0.0  # counter
    prompt_tokens: float = 0.0  # counter
    generation_tokens: float = 0.0  # counter
    ttft_buckets: dict[float, float] = field(default_factory=dict)  # cumulative: upper bound (s) -> count


_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # the name before vLLM 0.10
    "vllm:num_preemptions": "preemptions",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
}


def parse(text: str, at: float) -> EngineSample:
    """Sum over the engine's label sets (one per model and engine core)."""
    values: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "vllm:time_to_first_token_seconds":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
            continue
        name = _GAUGES.get(family.name)
        if name is None:
            continue
        total = sum(s.value for s in family.samples if not s.name.endswith("_created"))
        values[name] = values.get(name, 0.0) + total
    return EngineSample(at=at, ttft_buckets=buckets, **values)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile (0..1) of a cumulative histogram, interpolated within its bucket as Prometheus does."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound

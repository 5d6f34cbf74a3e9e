"""The concurrency health signal from engine readings (vLLM's own metric names) and gateway TTFTs."""

from __future__ import annotations

import pytest

from appliance.settings import TelemetrySettings
from appliance.telemetry.samples import EngineSample, histogram_quantile, parse
from appliance.telemetry.signal import COLLAPSING, DEGRADING, HEALTHY, assess, slope

VLLM_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="1.0",model_name="m"} 9.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 3.0
"""
SETTINGS = TelemetrySettings(window_s=30, min_ttft_samples=20)


def readings(waiting: list[float], running: float = 4.0, kv: float = 0.3) -> list[EngineSample]:
    return [EngineSample(at=float(t), running=running, waiting=w, kv_cache_usage=kv) for t, w in enumerate(waiting)]


def test_parse_reads_vllm_metric_names() -> None:
    sample = parse(VLLM_METRICS, at=5.0)
    assert (sample.running, sample.waiting, sample.kv_cache_usage, sample.preemptions) == (3.0, 7.0, 0.42, 2.0)
    assert sample.ttft_buckets == {0.1: 5.0, 1.0: 9.0, float("inf"): 10.0}
    assert histogram_quantile(0.5, sample.ttft_buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, sample.ttft_buckets) == pytest.approx(0.1 + 0.9 * 0.5)


def test_slope_is_least_squares() -> None:
    assert slope([(0, 0), (1, 2), (2, 4)]) == pytest.approx(2.0)
    assert slope([(0, 3)]) == 0.0


def test_a_steady_engine_with_even_ttft_is_healthy() -> None:
    health = assess(readings([0, 1, 0, 1, 0, 0]), [0.05] * 30, SETTINGS)
    assert health.state == HEALTHY and health.reasons == []
    assert health.inputs["ttft_source"] == "gateway"


def test_a_growing_queue_is_degrading_then_collapsing() -> None:
    assert assess(readings([0, 0.3, 0.6, 0.9, 1.2]), [], SETTINGS).state == DEGRADING
    health = assess(readings([0, 2, 4, 6, 8, 10]), [], SETTINGS)
    assert health.state == COLLAPSING and "queue growing 2.00 requests/s" in health.reasons[0]


def test_ttft_divergence_with_a_flat_p50_is_caught() -> None:
    ttfts = [0.05] * 95 + [0.5] * 5  # P50 flat at 50 ms, P99 ten times higher
    health = assess(readings([0] * 5), ttfts, SETTINGS)
    assert health.state == COLLAPSING and health.inputs["ttft_divergence"] == 10.0
    assert assess(readings([0] * 5), [0.05] * 95 + [0.25] * 5, SETTINGS).state == DEGRADING


def test_kv_pressure_and_preemptions() -> None:
    assert assess(readings([0] * 3, kv=0.85), [], SETTINGS).state == DEGRADING
    assert assess(readings([0] * 3, kv=0.97), [], SETTINGS).state == COLLAPSING
    preempting = [EngineSample(at=0, preemptions=1), EngineSample(at=1, preemptions=3)]
    assert assess(preempting, [], SETTINGS).state == DEGRADING


def test_three_degrading_inputs_together_are_collapsing() -> None:
    samples = [
        EngineSample(at=float(t), running=r, waiting=w, kv_cache_usage=0.85)
        for t, (r, w) in enumerate([(1, 0), (6, 0.3), (1, 0.6), (6, 0.9), (1, 1.2)])
    ]
    health = assess(samples, [], SETTINGS)
    assert health.state == COLLAPSING and len(health.reasons) == 3


def test_the_engine_histogram_stands_in_for_too_few_gateway_ttfts() -> None:
    first = EngineSample(at=0, ttft_buckets={0.1: 0, 1.0: 0, float("inf"): 0})
    last = EngineSample(at=10, ttft_buckets={0.1: 50, 1.0: 70, float("inf"): 70})
    health = assess([first, last], [0.05] * 3, SETTINGS)
    assert health.inputs["ttft_source"] == "engine" and health.inputs["ttft_divergence"] > 1


def test_a_standing_queue_is_degrading_even_when_it_shrinks() -> None:
    health = assess(readings([9, 8, 7, 6, 5]), [], SETTINGS)
    assert health.state == DEGRADING and "whole window" in health.reasons[0]

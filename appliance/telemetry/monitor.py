"""Engine telemetry: every engine's /metrics read on a short interval into a rolling window in memory, the
gateway's own time-to-first-token measurements beside it, and the concurrency health signal from both."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.gateway.admission import Admission
from appliance.gateway.upstream import EngineRouter
from appliance.ledger.writer import UsageEvent
from appliance.settings import EngineRoute, TelemetrySettings
from appliance.telemetry.gpu import GpuUtilization
from appliance.telemetry.rollup import Rollups
from appliance.telemetry.samples import EngineSample, parse
from appliance.telemetry.signal import LEVELS, Health, assess, worst

log = logging.getLogger(__name__)


class ConcurrencyMonitor:
    def __init__(
        self,
        router: EngineRouter,
        settings: TelemetrySettings,
        clock: Callable[[], float] = time.monotonic,
        rollups: Rollups | None = None,
        gpu: GpuUtilization | None = None,
    ) -> None:
        self._router = router
        self.rollups = rollups
        self._gpu = gpu or GpuUtilization(binary="")  # none: no readings
        self._gpu_read_at: float | None = None
        self.settings = settings
        self._clock = clock
        self._samples: dict[str, deque[EngineSample]] = {}
        self._ttfts: dict[str, deque[tuple[float, float]]] = {}
        self._errors: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-telemetry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            started = self._clock()
            routes = self._router.routes
            samples = await asyncio.gather(*(self.scrape(route.key, route.url) for route in routes))
            if self.rollups is not None:
                await self._read_gpu(started)
                await self._roll_up(routes, samples)
            await asyncio.sleep(max(self.settings.scrape_interval_s - (self._clock() - started), 0.05))

    async def _read_gpu(self, now: float) -> None:
        if not self._gpu.available or (
            self._gpu_read_at is not None and now - self._gpu_read_at < self._gpu.interval_s
        ):
            return
        self._gpu_read_at = now
        reading = await self._gpu.read()
        if reading is not None and self.rollups is not None:
            self.rollups.observe_gpu(reading)

    async def _roll_up(self, routes: list[EngineRoute], samples: list[EngineSample | None]) -> None:
        assert self.rollups is not None
        finished = []
        for route, sample in zip(routes, samples, strict=True):
            if sample is not None:
                row = self.rollups.add(route.key, route.model, sample, self.health(route.key).state)
                if row is not None:
                    finished.append(row)
        if finished:
            try:
                await asyncio.to_thread(self.rollups.write, finished)
            except Exception:
                log.exception("writing %d telemetry roll-ups failed; they are lost", len(finished))

    async def scrape(self, engine: str, url: str) -> EngineSample | None:
        try:
            status, raw = await self._router.fetch(url, "/metrics", max(self.settings.scrape_interval_s, 1.0))
            if status != 200:
                raise ValueError(f"/metrics answered {status}")
            text = raw.decode("utf-8", "replace")
            sample = parse(text, self._clock())
            self.add(engine, sample)
            self._errors.pop(engine, None)
            return sample
        except Exception as exc:  # an engine that is down has no metrics; readiness reports it
            self._errors[engine] = f"{type(exc).__name__}: {exc}"
            return None

    def add(self, engine: str, sample: EngineSample) -> None:
        self._samples.setdefault(engine, deque()).append(sample)

    def observe_ttft(self, engine: str, seconds: float) -> None:
        self._ttfts.setdefault(engine, deque()).append((self._clock(), seconds))
        if self.rollups is not None:
            self.rollups.observe_ttft(engine, seconds)

    def observe_event(self, event: UsageEvent) -> None:
        """A request the gateway finished: its TTFT (streamed answers) and its outcome, per engine."""
        engine = event.engine or event.model
        if event.status_code == 200 and event.ttft_ms is not None:
            self.observe_ttft(engine, event.ttft_ms / 1000.0)
        if self.rollups is not None:
            self.rollups.observe_request(engine, event.status_code)

    def health(self, engine: str) -> Health:
        horizon = self._clock() - self.settings.window_s
        samples = self._samples.setdefault(engine, deque())
        while samples and samples[0].at < horizon:
            samples.popleft()
        ttfts = self._ttfts.setdefault(engine, deque())
        while ttfts and ttfts[0][0] < horizon:
            ttfts.popleft()
        health = assess(list(samples), [seconds for _, seconds in ttfts], self.settings)
        if engine in self._errors:
            health.inputs["scrape_error"] = self._errors[engine]
        return health

    def report(self) -> dict[str, Any]:
        engines = {
            route.key: dict(self.health(route.key).as_dict(), model=route.model, url=route.url)
            for route in self._router.routes
        }
        return {
            "state": worst([engine["state"] for engine in engines.values()]),
            "window_s": self.settings.window_s,
            "engines": engines,
        }


class TelemetryCollector(Collector):
    """Gauges for /metrics, read when scraped: the signal, its inputs, and the admission tiers."""

    def __init__(self, monitor: ConcurrencyMonitor, admission: Admission | None) -> None:
        self._monitor = monitor
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        report = self._monitor.report()
        state = GaugeMetricFamily(
            "appliance_concurrency_state",
            "Concurrency health per engine: 1 for its current state (healthy, degrading, collapsing).",
            labels=["engine", "model", "state"],
        )
        inputs = {
            "queue_depth": ("appliance_engine_requests_waiting", "Requests waiting in the engine."),
            "running": ("appliance_engine_requests_running", "Requests the engine is processing."),
            "kv_cache_usage": ("appliance_engine_kv_cache_usage_ratio", "KV-cache usage of the engine (0-1)."),
            "queue_trend_per_s": ("appliance_engine_queue_trend", "Slope of the engine's queue, requests/s."),
            "ttft_divergence": ("appliance_ttft_divergence_ratio", "P99 over P50 time to first token."),
        }
        gauges = {
            key: GaugeMetricFamily(name, text, labels=["engine", "model"]) for key, (name, text) in inputs.items()
        }
        for name, engine in report["engines"].items():
            for level in LEVELS:
                state.add_metric([name, engine["model"], level], 1.0 if engine["state"] == level else 0.0)
            for key, gauge in gauges.items():
                if key in engine["inputs"]:
                    gauge.add_metric([name, engine["model"]], float(engine["inputs"][key]))
        yield state
        yield from gauges.values()
        if self._admission is None:
            return
        in_flight = GaugeMetricFamily(
            "appliance_admission_in_flight", "Requests holding a slot of an admission tier.", labels=["engine", "tier"]
        )
        waiting = GaugeMetricFamily(
            "appliance_admission_waiting",
            "Requests waiting for a slot of an admission tier.",
            labels=["engine", "tier"],
        )
        for engine_name, tiers in self._admission.snapshot().items():
            for tier, figures in tiers.items():
                in_flight.add_metric([engine_name, tier], figures["in_flight"])
                waiting.add_metric([engine_name, tier], figures["waiting"])
        yield in_flight
        yield waiting

"""Drift as metrics: the findings recomputed on an interval in a worker thread, exported on ``/metrics`` as
``appliance_drift_finding{scope,id,signal} 1`` and ``appliance_drift_statistic{scope,id,signal,test}`` (PSI or z),
so alert rules can name the workflow or agent and the change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from appliance.drift.report import drift_report

log = logging.getLogger(__name__)


class DriftWatcher(Collector):
    def __init__(self, engine: Engine, interval_s: float, window: str = "day") -> None:
        self._engine = engine
        self.interval_s = interval_s
        self._window = window
        self.findings: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="drift-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def refresh(self) -> None:
        report = await asyncio.to_thread(drift_report, self._engine, window=self._window)
        self.findings = report["findings"]

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:
                log.exception("computing drift findings failed; the last ones stay exported")
            await asyncio.sleep(self.interval_s)

    def collect(self) -> Iterator[Metric]:
        finding = GaugeMetricFamily(
            "appliance_drift_finding",
            "1 for each drift finding: a workflow, agent or model whose behaviour changed (see /admin/drift).",
            labels=["scope", "id", "signal"],
        )
        statistic = GaugeMetricFamily(
            "appliance_drift_statistic",
            "The test statistic of each drift finding (population stability index, or two-proportion z).",
            labels=["scope", "id", "signal", "test"],
        )
        for item in self.findings:
            finding.add_metric([item["scope"], item["id"], item["signal"]], 1.0)
            statistic.add_metric([item["scope"], item["id"], item["signal"], item["test"]], float(item["statistic"]))
        yield finding
        yield statistic

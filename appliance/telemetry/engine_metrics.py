"""The engines' own Prometheus metrics (vLLM's ``vllm:*``), read through the gateway.

Engines listen on loopback only; ``GET /metrics/engines`` (operators, as ``/metrics``) reads every engine's
``/metrics`` when scraped, adds the labels ``engine`` (its name in telemetry) and ``model`` to every sample, and
merges the families of all engines into one exposition. A label an engine already sets under one of those names
(vLLM's ``engine`` is its data-parallel index) is kept as ``exported_<name>``, as Prometheus itself renames
a conflicting target label. ``appliance_engine_metrics_up{engine,model}`` says whose metrics were read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from appliance.gateway.upstream import EngineRouter
from appliance.lib.httpclient import HTTPClientError
from appliance.settings import EngineRoute

ADDED = ("engine", "model")
UP_METRIC = "appliance_engine_metrics_up"


def relabel(family: Metric, route: EngineRoute) -> list[Sample]:
    """The family's samples with ``engine`` and ``model`` set to the route's (an engine's own kept renamed)."""
    samples = []
    for sample in family.samples:
        labels = {(f"exported_{key}" if key in ADDED else key): value for key, value in sample.labels.items()}
        labels.update(engine=route.key, model=route.model)
        samples.append(sample._replace(labels=labels))
    return samples


def merge(texts: Iterable[tuple[EngineRoute, str | None]]) -> list[Metric]:
    """One family per metric name over every engine (first HELP and type win), and the up gauge."""
    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(UP_METRIC, "1 when the engine's own /metrics was read for this scrape.", labels=ADDED)
    for route, text in texts:
        parsed = _parse(text)
        up.add_metric([route.key, route.model], 0.0 if parsed is None else 1.0)
        for family in parsed or []:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(relabel(family, route))
    return [*families.values(), up]


def _parse(text: str | None) -> list[Metric] | None:
    if text is None:
        return None
    try:
        return list(text_string_to_metric_families(text))
    except ValueError:  # not Prometheus text: that engine's metrics are not read
        return None


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render(families: list[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


async def engine_metrics(router: EngineRouter, timeout_s: float = 5.0) -> bytes:
    """Every engine's metrics, read concurrently (an engine that does not answer in time counts as down)."""
    routes = router.routes

    async def read(route: EngineRoute) -> str | None:
        try:
            status, raw = await router.fetch(route.url, "/metrics", timeout_s)
        except (TimeoutError, HTTPClientError, OSError):
            return None
        return raw.decode("utf-8", "replace") if status == 200 else None

    texts = await asyncio.gather(*(read(route) for route in routes))
    return render(merge(zip(routes, texts, strict=True)))

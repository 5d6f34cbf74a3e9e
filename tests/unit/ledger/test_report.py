"""Usage and cost reports (/admin/usage) and the Prometheus metrics (/metrics), from real requests through
the gateway to the fake engine (5 prompt + 4 completion tokens per answer)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.ledger.report import percentile
from appliance.settings import ModelPrice, PricingSettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import Client, admin_headers, fake_settings, tenant_with_key

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "one two three four five"}]}


@pytest.fixture
def settings(tmp_path: Path, fake_engine: FakeEngine) -> Settings:
    price = ModelPrice(prompt_per_million=1000.0, completion_per_million=2000.0)  # 0.013 per answer
    return fake_settings(tmp_path, fake_engine, pricing=PricingSettings(currency="CHF", models={"fake": price}))


@pytest.fixture
async def traffic(settings: Settings) -> AsyncIterator[tuple[Client, dict[str, str], dict[str, Any]]]:
    """Acme: 3 answers (one streamed), a retry of one of them, and a refusal; globex: 1 answer."""
    async with AsyncTestClient(app=create_app(settings)) as client:
        admin = admin_headers(settings)
        acme = await tenant_with_key(client, admin, "acme")
        globex = await tenant_with_key(client, admin, "globex")
        await client.post(
            "/admin/budgets/",
            json={"scope_type": "workflow", "scope_id": acme["workflow"]["id"], "kind": "requests", "limit": 4},
            headers=admin,
        )
        send = acme["headers"]
        for headers in ({}, {"Idempotency-Key": "job-1"}, {"Idempotency-Key": "job-1"}):
            assert (await client.post("/v1/chat/completions", json=CHAT, headers={**send, **headers})).is_success
        streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=send)
        assert streamed.is_success
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=send)).status_code == 429
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=globex["headers"])).is_success
        for _ in range(100):  # usage rows are written off the hot path
            if len((await client.get("/admin/usage/requests", headers=admin)).json()["data"]) == 6:
                break
            await asyncio.sleep(0.05)
        yield client, admin, {"acme": acme, "globex": globex}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0


async def test_usage_by_workflow_counts_tokens_cost_retries_and_latency(traffic: Any) -> None:
    client, admin, ids = traffic
    report = (await client.get("/admin/usage/", params={"group_by": "workflow"}, headers=admin)).json()
    assert report["currency"] == "CHF"
    rows = {row["group"]: row for row in report["data"]}
    acme = rows[ids["acme"]["workflow"]["id"]]
    assert (acme["requests"], acme["served"], acme["refused"], acme["errors"]) == (5, 4, 1, 0)
    assert (acme["prompt_tokens"], acme["completion_tokens"], acme["total_tokens"]) == (20, 16, 36)
    assert acme["cost"] == pytest.approx(4 * 0.013)
    assert (acme["retries"], acme["retry_rate"]) == (1, 0.2)
    assert 0 < acme["latency_p50_ms"] <= acme["latency_p99_ms"]
    assert acme["ttft_p50_ms"] is not None, "the streamed answer has a time to first token"
    assert rows[ids["globex"]["workflow"]["id"]]["requests"] == 1


async def test_usage_in_hourly_buckets_and_as_csv(traffic: Any) -> None:
    client, admin, _ids = traffic
    now = datetime.now(UTC)
    params = {"group_by": "model", "bucket": "hour", "from": (now - timedelta(hours=2)).isoformat()}
    [row] = (await client.get("/admin/usage/", params=params, headers=admin)).json()["data"]
    assert row["group"] == "fake" and row["requests"] == 6
    assert datetime.fromisoformat(row["bucket"]) == now.replace(minute=0, second=0, microsecond=0)

    exported = await client.get("/admin/usage/", params={**params, "format": "csv"}, headers=admin)
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    [line] = list(csv.DictReader(io.StringIO(exported.text)))
    assert (line["group"], line["requests"], line["cost"]) == ("fake", "6", str(round(5 * 0.013, 6)))

    requests = await client.get("/admin/usage/requests", params={"format": "csv", "limit": 2}, headers=admin)
    lines = list(csv.DictReader(io.StringIO(requests.text)))
    assert len(lines) == 2 and {"request_id", "cost", "retry_attempt", "latency_ms"} <= set(lines[0])


async def test_usage_is_scoped_to_the_principals_tenant(traffic: Any, settings: Settings) -> None:
    client, _admin, ids = traffic
    tenant = ids["globex"]["tenant"]["id"]
    token = embedded_issuer(settings).mint("ops", client_id="c", roles=["operator"], tenant_id=tenant)
    scoped = {"Authorization": f"Bearer {token}"}
    rows = (await client.get("/admin/usage/", params={"group_by": "tenant"}, headers=scoped)).json()["data"]
    assert [row["group"] for row in rows] == [tenant]
    assert (await client.get("/metrics", headers=scoped)).status_code == 403
    auditor = admin_headers(settings, roles=("auditor",))
    assert (await client.get("/admin/usage/", headers=auditor)).status_code == 403


async def test_bad_report_parameters_are_refused(traffic: Any) -> None:
    client, admin, _ids = traffic
    bad_group = await client.get("/admin/usage/", params={"group_by": "colour"}, headers=admin)
    assert bad_group.status_code == 400
    backwards = await client.get(
        "/admin/usage/", params={"from": "2026-11-02T00:00:00Z", "to": "2026-11-01T00:00:00Z"}, headers=admin
    )
    assert backwards.status_code == 400 and backwards.json()["error"]["param"] == "from"


async def test_prometheus_metrics(traffic: Any) -> None:
    client, admin, ids = traffic
    response = await client.get("/metrics", headers=admin)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    tenant, workflow = ids["acme"]["tenant"]["id"], ids["acme"]["workflow"]["id"]
    scope = {"tenant": tenant, "workflow": workflow, "model": "fake"}
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert families["appliance_tokens"].type == "counter"

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in families[name].samples if s.name == f"{name}_total" and s.labels == labels)

    assert value("appliance_tokens", **scope, type="completion") == 16.0
    assert value("appliance_cost", **scope, currency="CHF") == pytest.approx(4 * 0.013)
    assert value("appliance_requests", **scope, status="429") == 1.0
    [refusal] = [s for s in families["appliance_budget_refusals"].samples if s.name.endswith("_total")]
    assert (refusal.labels["tenant"], refusal.labels["reason"], refusal.value) == (tenant, "budget_exceeded", 1.0)
    assert value("appliance_retries", tenant=tenant, workflow=workflow, agent="-") == 1.0
    latency = families["appliance_request_duration_seconds"]
    assert latency.type == "histogram" and any(s.name.endswith("_bucket") for s in latency.samples)

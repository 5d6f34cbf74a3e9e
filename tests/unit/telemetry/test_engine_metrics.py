"""The engines' own metrics through the gateway (``/metrics/engines``): every engine's samples labelled with its
name and model, one family per metric over all engines (a valid exposition Prometheus accepts), the engine's
own ``engine`` label kept as ``exported_engine``, a down engine reported as such, and only for operators."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings
from appliance.telemetry.engine_metrics import merge, render
from tests.support.fake_engine import FakeEngine, free_port
from tests.support.gateway import add_tenant

# The shape of vLLM 0.32's exposition (a gauge, a counter with its _created, a histogram), trimmed.
VLLM_TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="chat"} 2.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="chat"} 120.0
vllm:generation_tokens_created{engine="0",model_name="chat"} 1.7e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="chat"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="chat"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="chat"} 4.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="chat"} 0.9
"""


def test_two_engines_merge_into_one_family_per_metric_with_their_labels() -> None:
    a = EngineRoute(model="chat", url="http://127.0.0.1:1", name="chat@a")
    b = EngineRoute(model="chat", url="http://127.0.0.1:2", name="chat@b")
    down = EngineRoute(model="embed", url="http://127.0.0.1:3")
    text = render(merge([(a, VLLM_TEXT), (b, VLLM_TEXT.replace("120.0", "7.0")), (down, None)])).decode()
    assert text.count("# TYPE vllm:generation_tokens_total counter") == 1, "one family, not one per engine"
    families = {family.name: family for family in text_string_to_metric_families(text)}
    tokens = {s.labels["engine"]: s for s in families["vllm:generation_tokens"].samples if s.name.endswith("_total")}
    assert {name: s.value for name, s in tokens.items()} == {"chat@a": 120.0, "chat@b": 7.0}
    assert tokens["chat@a"].labels == {
        "engine": "chat@a",
        "model": "chat",
        "exported_engine": "0",
        "model_name": "chat",
    }
    buckets = [s for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert len(buckets) == 4 and {s.labels["le"] for s in buckets} == {"0.1", "+Inf"}
    up = {s.labels["engine"]: s.value for s in families["appliance_engine_metrics_up"].samples}
    assert up == {"chat@a": 1.0, "chat@b": 1.0, "embed": 0.0}


def test_text_that_is_not_prometheus_counts_as_down() -> None:
    route = EngineRoute(model="chat", url="http://127.0.0.1:1")
    families = {f.name: f for f in merge([(route, "<html>not metrics</html>\n{")])}
    assert [s.value for s in families["appliance_engine_metrics_up"].samples] == [0.0]


@pytest.fixture
def metrics_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine(metrics=True)
    engine.start()
    yield engine
    engine.stop()


async def test_the_route_serves_every_engine_to_operators_only(tmp_path: Path, metrics_engine: FakeEngine) -> None:
    routes = [
        EngineRoute(model="fake", url=metrics_engine.url),
        EngineRoute(model="gone", url=f"http://127.0.0.1:{free_port()}"),
    ]
    settings = Settings(data_dir=tmp_path, gateway=GatewaySettings(routes=routes))
    issuer = embedded_issuer(settings)
    add_tenant(settings, "t1")

    def bearer(roles: list[str], tenant_id: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {issuer.mint('x', client_id='c', roles=roles, tenant_id=tenant_id)}"}

    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/metrics/engines")).status_code == 401
        assert (await client.get("/metrics/engines", headers=bearer(["user"], "t1"))).status_code == 403
        assert (await client.get("/metrics/engines", headers=bearer(["admin"], "t1"))).status_code == 403
        response = await client.get("/metrics/engines", headers=bearer(["operator"]))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = [s for family in text_string_to_metric_families(response.text) for s in family.samples]
    running = [s for s in samples if s.name == "vllm:num_requests_running"]
    assert [s.labels for s in running] == [{"model_name": "fake", "engine": "fake", "model": "fake"}]
    up = {s.labels["engine"]: s.value for s in samples if s.name == "appliance_engine_metrics_up"}
    assert up == {"fake": 1.0, "gone": 0.0}

"""The operator kit (deploy/observability) refers only to what the appliance exports: every ``appliance_*``
metric named in an alert rule or a dashboard panel is on /metrics or /metrics/engines, and every label an
expression selects or groups by is a label of a metric it uses. The engines' own ``vllm:*`` names are checked
against a real vLLM engine through /metrics/engines (tests/integration/test_engine_metrics.py); here, that the
kit scrapes that route and that no other name slips in."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from litestar.testing import AsyncTestClient

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine
from tests.support.gateway import add_tenant
from tests.support.operator_kit import KIT, expressions, problems, series, used


@pytest.fixture
def metrics_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine(metrics=True)
    engine.start()
    yield engine
    engine.stop()


async def exported(tmp_path: Path, fake_engine: FakeEngine) -> dict[str, set[str]]:
    """The appliance's own series on /metrics and /metrics/engines, after one answered request (so labelled
    counters have samples)."""
    settings = Settings(
        data_dir=tmp_path, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)])
    )
    issuer = embedded_issuer(settings)
    add_tenant(settings, "t1")
    user = issuer.mint("app", client_id="appliance-console", roles=["user"], tenant_id="t1")
    operator = {"Authorization": f"Bearer {issuer.mint('prometheus', client_id='c', roles=['operator'])}"}
    async with AsyncTestClient(app=create_app(settings)) as client:
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        answer = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user}"})
        assert answer.status_code == 200, answer.text
        text = (await client.get("/metrics", headers=operator)).text
        engines = (await client.get("/metrics/engines", headers=operator)).text
    own = series(text)
    own.update({name: labels for name, labels in series(engines).items() if name.startswith("appliance_")})
    return own


async def test_every_expression_uses_exported_metrics_and_their_labels(
    tmp_path: Path, metrics_engine: FakeEngine
) -> None:
    kit = expressions()
    assert len(kit) >= 20, "the kit was read"
    for where, expr in kit:
        assert used(expr)[0], f"{where}: no metric found in {expr!r}"
    # vllm:* names are a real engine's to export: their check runs against one (integration).
    own = [(where, expr) for where, expr in kit if not any(m.startswith("vllm:") for m in used(expr)[0])]
    assert len(own) < len(kit), "the kit uses the engines' own metrics"
    assert problems(own, await exported(tmp_path, metrics_engine)) == []


def test_a_metric_the_appliance_does_not_export_is_reported() -> None:
    exported = {"appliance_requests_total": {"tenant", "model", "status"}}
    assert problems([("a", "sum by (model) (rate(appliance_requests_total[5m]))")], exported) == []
    assert problems([("b", "appliance_nothing_total > 0")], exported) == [
        ("b", "metric appliance_nothing_total is not exported")
    ]
    assert problems([("c", "sum by (agent) (appliance_requests_total)")], exported)
    assert used("rate(vllm:num_preemptions_total[5m])")[0] == {"vllm:num_preemptions_total"}


def test_the_scrape_configuration_uses_the_operator_client_flow_for_both_routes() -> None:
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {job["metrics_path"] for job in jobs.values()} == {"/metrics", "/metrics/engines"}
    for job in jobs.values():
        assert job["scheme"] == "https"
        assert job["oauth2"]["token_url"].endswith("/oidc/token") and "client_secret_file" in job["oauth2"]
    assert config["rule_files"]

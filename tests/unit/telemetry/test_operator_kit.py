"""The operator kit (deploy/observability) refers only to what the appliance exports: every metric named in an
alert rule or a dashboard panel is on /metrics, and every label an expression selects or groups by is a label
of a metric it uses."""

import json
import re
from pathlib import Path
from typing import Any

import yaml
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance.asgi import create_app
from appliance.identity.setup import embedded_issuer
from appliance.settings import REPO_ROOT, EngineRoute, GatewaySettings, Settings
from tests.support.fake_engine import FakeEngine

KIT = REPO_ROOT / "deploy" / "observability"
PROMETHEUS_LABELS = {"job", "instance", "le"}


def expressions() -> list[tuple[str, str]]:
    found = []
    for group in yaml.safe_load((KIT / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= set(rule), rule
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            found.append((f"alert {rule['alert']}", rule["expr"]))
    dashboard = json.loads((KIT / "grafana" / "appliance.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']}", target["expr"]))
    return found


async def exported(tmp_path: Path, fake_engine: FakeEngine) -> dict[str, set[str]]:
    """series name -> label names seen, after one answered request (so labelled counters have samples)."""
    settings = Settings(
        data_dir=tmp_path, gateway=GatewaySettings(routes=[EngineRoute(model="fake", url=fake_engine.url)])
    )
    issuer = embedded_issuer(settings)
    user = issuer.mint("app", client_id="appliance-console", roles=["user"], tenant_id="t1")
    operator = issuer.mint("prometheus", client_id="appliance-console", roles=["operator"])
    async with AsyncTestClient(app=create_app(settings)) as client:
        body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {user}"})
        text = (await client.get("/metrics", headers={"Authorization": f"Bearer {operator}"})).text
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        names = {family.name}
        if family.type == "counter":
            names = {f"{family.name}_total"}
        elif family.type == "histogram":
            names = {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        labels = {label for sample in family.samples for label in sample.labels}
        for name in names:
            series[name] = labels
    return series


def used(expr: str) -> tuple[set[str], set[str]]:
    metrics = set(re.findall(r"\b(appliance_[a-z0-9_]+|up)\b(?!\s*\()", expr))
    labels = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", selector))
    for grouping in re.findall(r"\b(?:by|on|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    return metrics, labels


async def test_every_expression_uses_exported_metrics_and_their_labels(tmp_path: Path, fake_engine: FakeEngine) -> None:
    series = await exported(tmp_path, fake_engine)
    problems: list[Any] = []
    kit = expressions()
    assert len(kit) >= 20, "the kit was read"
    for where, expr in kit:
        metrics, labels = used(expr)
        assert metrics, f"{where}: no metric found in {expr!r}"
        for metric in metrics - {"up"}:
            if metric not in series:
                problems.append((where, f"metric {metric} is not exported"))
        known = set().union(*(series.get(metric, set()) for metric in metrics)) | PROMETHEUS_LABELS
        sampled = all(series.get(metric) for metric in metrics - {"up"})
        if sampled:  # label names are only known for metrics that had a sample in this run
            problems.extend((where, f"label {label} is not a label of {sorted(metrics)}") for label in labels - known)
    assert problems == []


def test_the_scrape_configuration_uses_the_operator_client_flow() -> None:
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    assert job["oauth2"]["token_url"].endswith("/oidc/token") and "client_secret_file" in job["oauth2"]
    assert config["rule_files"]

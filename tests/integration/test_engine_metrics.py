"""The engines' own metrics through the gateway, from real vLLM engines: ``/metrics/engines`` carries every
engine's ``vllm:*`` series labelled with its engine and model, and every ``vllm:*`` name (and label) the operator
kit's alerts and dashboard use is among them, so the kit reads only what a real engine exports."""

from __future__ import annotations

import urllib.request

from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import CHAT_MODEL, Appliance
from tests.integration.test_identity import cli_token
from tests.support.operator_kit import expressions, problems, series, used


def engines_metrics(appliance: Appliance, token: str) -> str:
    request = urllib.request.Request(
        appliance.gateway_url + "/metrics/engines", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/plain")
        return str(response.read().decode())


def test_every_vllm_metric_of_the_kit_comes_through_the_gateway(appliance: Appliance, client: OpenAI) -> None:
    # One answer first, so the engine's histograms and counters have moved.
    client.chat.completions.create(model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8)
    text = engines_metrics(appliance, cli_token(appliance, "--role", "operator"))
    models = {e["model"] for e in appliance.status()["engines"]}

    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    vllm = [s for s in samples if s.name.startswith("vllm:")]
    assert vllm, "the engines' own metrics came through"
    assert all(s.labels["engine"] for s in vllm), "every sample names its engine"
    assert {s.labels["model"] for s in vllm} == models, "every engine's metrics, each with its model"
    up = {s.labels["model"]: s.value for s in samples if s.name == "appliance_engine_metrics_up"}
    assert up == dict.fromkeys(models, 1.0)

    kit = [(where, expr) for where, expr in expressions() if any(m.startswith("vllm:") for m in used(expr)[0])]
    assert kit, "the kit uses the engines' own metrics"
    assert problems(kit, series(text)) == []

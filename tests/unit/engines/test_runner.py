from dataclasses import replace
from pathlib import Path

import pytest

from appliance.engines.manifest import load_manifests
from appliance.engines.runner import cpu_binding, cpu_dtype, engine_command, engine_specs
from appliance.settings import EngineSettings, Settings


@pytest.mark.parametrize(
    ("runner", "cpus", "expected"),
    [("generate", 2, "0"), ("pooling", 2, "1"), ("generate", 16, "0-14"), ("pooling", 16, "15"), ("generate", 1, None)],
)
def test_default_binding_keeps_embedding_engines_off_the_generation_cores(
    runner: str, cpus: int, expected: str | None
) -> None:
    assert cpu_binding(runner, 0, [], cpus) == expected


def test_configured_binding_wins_in_model_order() -> None:
    assert [cpu_binding("generate", i, ["0-1", "2"], 4) for i in range(3)] == ["0-1", "2", "0-1"]


def test_cpu_engines_use_bfloat16_only_where_the_cpu_computes_it(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_dtype(info) == "bfloat16"
    info.write_text("flags\t: fpu sse avx2 avx512f\n")
    assert cpu_dtype(info) == "float32"
    assert cpu_dtype(tmp_path / "missing") == "float32"


def test_replicas_get_their_own_ports_and_logs(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        engines=EngineSettings(models=["smollm2-135m-instruct", "minilm-l6-v2"], replicas={"smollm2-135m-instruct": 2}),
    )
    specs = engine_specs(settings, load_manifests(settings.models_dir, settings.engines.models))
    assert [(spec.manifest.name, spec.port, spec.log_path.name) for spec in specs] == [
        ("smollm2-135m-instruct", 8101, "engine-smollm2-135m-instruct.log"),
        ("smollm2-135m-instruct", 8102, "engine-smollm2-135m-instruct-1.log"),
        ("minilm-l6-v2", 8103, "engine-minilm-l6-v2.log"),
    ]
    command = engine_command(specs[0], Path("python"), settings)
    assert command[command.index("--dtype") + 1] in ("bfloat16", "float32")


def test_engines_start_with_the_parsers_their_manifest_declares(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engines=EngineSettings(models=["smollm2-135m-instruct", "minilm-l6-v2"]))
    chat, embed = engine_specs(settings, load_manifests(settings.models_dir, settings.engines.models))
    command = engine_command(chat, Path("python"), settings)
    assert "--enable-auto-tool-choice" in command
    assert command[command.index("--tool-call-parser") + 1] == "hermes"
    assert "--reasoning-parser" not in command
    assert "--tool-call-parser" not in engine_command(embed, Path("python"), settings)
    reasoning = chat.manifest.model_copy(update={"reasoning_parser": "deepseek_r1"})
    command = engine_command(replace(chat, manifest=reasoning), Path("python"), settings)
    assert command[command.index("--reasoning-parser") + 1] == "deepseek_r1"

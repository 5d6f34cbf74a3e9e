"""``appliance engines list|exec``: the one way an engine starts on a node, from the development runner's code."""

import argparse
import json
from pathlib import Path

import pytest
import yaml

from appliance.engines import cli
from appliance.engines.manifest import MANIFEST_FILE, PREPARED_MARKER, load_manifest, sha256_file
from appliance.engines.runner import configured_specs, engine_env, engine_routes, vllm_cache_root
from appliance.settings import REPO_ROOT, EngineSettings, Settings


def node_settings(tmp_path: Path, weights: bytes = b"weights") -> Settings:
    """A node's layout: manifests and prepared weights in one folder, an engine venv with a python in it."""
    models = tmp_path / "models"
    for name in ("smollm2-135m-instruct", "minilm-l6-v2"):
        folder = models / name
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(weights + name.encode())
        manifest = load_manifest(REPO_ROOT / "models" / name / MANIFEST_FILE)
        data = manifest.model_dump(mode="json")
        data["weights"] = {"weights.bin": sha256_file(folder / "weights.bin")}
        (folder / MANIFEST_FILE).write_text(yaml.safe_dump(data))
        (folder / PREPARED_MARKER).write_text("")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    return Settings(
        data_dir=tmp_path / "data",
        models_dir=models,
        models_cache_dir=models,
        engines=EngineSettings(models=["smollm2-135m-instruct", "minilm-l6-v2"], port_base=8201, venv=venv),
    )


def run(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_parsers(parser.add_subparsers(dest="command"))
    return cli.run(settings, parser.parse_args(["engines", *argv]))


def test_exec_prints_the_runner_command_with_the_offline_and_no_egress_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = node_settings(tmp_path)
    assert run(settings, "exec", "minilm-l6-v2", "--print") == 0
    printed = json.loads(capsys.readouterr().out)
    command, env = printed["command"], printed["env"]
    assert command[0] == str(tmp_path / "venv" / "bin" / "python")
    assert command[command.index("--port") + 1] == "8202" and command[command.index("--runner") + 1] == "pooling"
    assert command[command.index("--max-model-len") + 1].isdigit() and "--dtype" in command
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "GLOO_SOCKET_IFNAME": "lo",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "MALLOC_MMAP_THRESHOLD_": "262144",  # an embedding worker's memory stays flat (see engine_env)
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8",  # and does not climb with every batch shape it meets
        "VLLM_USE_AOT_COMPILE": "0",  # a restart reads the compiled model back instead of compiling it again
    }.items():
        assert env[name] == value, name
    chat = next(spec for spec in configured_specs(settings) if spec.manifest.runner == "generate")
    chat_env = engine_env(settings, chat, 0)
    for name in ("MALLOC_MMAP_THRESHOLD_", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
        assert name not in chat_env, f"{name}: only for pooling engines"
    assert chat_env["VLLM_USE_AOT_COMPILE"] == "0"


def test_the_compile_cache_outlives_the_engine_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's cache sits beside vLLM's in the engines' home, not in torch's default /tmp/torchinductor_<user>,
    which a node's engine unit (PrivateTmp) loses at every stop, so every restart compiled the model again."""
    settings = node_settings(tmp_path)
    chat = next(spec for spec in configured_specs(settings) if spec.manifest.runner == "generate")
    for name in ("VLLM_CACHE_ROOT", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/var/lib/vllm")  # the node's unit sets it
    assert engine_env(settings, chat, 0)["TORCHINDUCTOR_CACHE_DIR"] == "/var/lib/vllm/.cache/vllm/torchinductor"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine_env(settings, chat, 0)["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "vllm" / "torchinductor")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "root"))
    assert vllm_cache_root(engine_env(settings, chat, 0)) == tmp_path / "root"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/inductor")  # a value set by the operator is kept
    assert engine_env(settings, chat, 0)["TORCHINDUCTOR_CACHE_DIR"] == "/srv/inductor"


def test_exec_refuses_an_unknown_engine_and_altered_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = node_settings(tmp_path)
    assert run(settings, "exec", "no-such-model", "--print") == 2
    assert "known: smollm2-135m-instruct, minilm-l6-v2" in capsys.readouterr().err
    (settings.prepared_models_dir / "minilm-l6-v2" / "weights.bin").write_bytes(b"tampered")
    assert run(settings, "exec", "minilm-l6-v2", "--print") == 1
    assert "minilm-l6-v2" in capsys.readouterr().err


def test_list_and_the_gateway_routes_agree_with_the_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = node_settings(tmp_path)
    assert run(settings, "list") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["name"], row["url"]) for row in listed] == [
        ("smollm2-135m-instruct", "http://127.0.0.1:8201"),
        ("minilm-l6-v2", "http://127.0.0.1:8202"),
    ]
    routes = engine_routes(settings)
    assert [(r.model, r.url, r.runner) for r in routes] == [
        ("smollm2-135m-instruct", "http://127.0.0.1:8201", "generate"),
        ("minilm-l6-v2", "http://127.0.0.1:8202", "pooling"),
    ]

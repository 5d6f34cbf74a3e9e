"""Importing model versions: files and facts recorded, and refusals with their reason. The architecture check
runs the real engine environment's Python (vLLM's own model registry), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from appliance.engines.manifest import sha256_file
from appliance.registry.importer import ImportRefused, import_model
from appliance.registry.models import ModelTransition
from appliance.registry.options import ServingOptionsError, parse_options
from appliance.settings import Settings
from tests.unit.registry.conftest import tiny_model


def test_a_folder_is_imported_with_checksums_and_config_facts(db: Engine, settings: Settings, model_dir: Path) -> None:
    (model_dir / "modeling_evil.py").write_text("import os\n")  # code is never copied
    with Session(db) as session:
        version = import_model(
            session, settings, model_dir, "team-chat", "alice", parse_options({"prefix_caching": True})
        )
        assert (version.served_name, version.version, version.state) == ("team-chat", 1, "imported")
        assert version.architecture == "LlamaForCausalLM" and version.runner == "generate"
        assert version.context_length == 8192 and version.dtype == "bfloat16"
        assert version.param_count == 4 * 8 + 16
        files = {record["path"]: record for record in version.files}
        assert "modeling_evil.py" not in files
        weights = files["model.safetensors"]
        assert weights["sha256"] == sha256_file(model_dir / "model.safetensors")
        assert weights["size"] == (model_dir / "model.safetensors").stat().st_size
        assert Path(version.path) == settings.registry_dir / "team-chat" / "v1"
        assert (Path(version.path) / "tokenizer.json").is_file()
        assert version.options == {"prefix_caching": True, "replicas": 1}
        transitions = session.exec(select(ModelTransition)).all()
        assert [(t.action, t.to_state, t.actor) for t in transitions] == [("import", "imported", "alice")]
        second = import_model(session, settings, model_dir, "team-chat", "alice")
        assert second.version == 2


def refused(db: Engine, settings: Settings, source: Path, **kwargs: object) -> str:
    with Session(db) as session, pytest.raises((ImportRefused, ServingOptionsError)) as caught:
        import_model(session, settings, source, "m1", "alice", **kwargs)  # type: ignore[arg-type]
    assert not list(settings.registry_dir.glob("m1/*")), "a refused import leaves no version folder"
    assert not list(settings.registry_dir.glob(".staging-*")), "nor a staging folder"
    return str(caught.value.message)


def test_an_architecture_vllm_does_not_have_is_refused(db: Engine, settings: Settings, tmp_path: Path) -> None:
    if not (Path(__file__).parents[3] / "var" / "models" / "smollm2-135m-instruct").exists():
        pytest.skip("the bundled chat model is not prepared")
    source = tiny_model(tmp_path / "odd", architectures=["FluxCapacitorForCausalLM"])
    assert "vLLM cannot serve architecture FluxCapacitorForCausalLM" in refused(db, settings, source)


def test_unservable_layouts_are_refused_with_their_reason(
    db: Engine, settings: Settings, model_dir: Path, tmp_path: Path
) -> None:
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((model_dir / "config.json").read_text())
    (no_tokenizer / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    assert "no tokenizer" in refused(db, settings, no_tokenizer)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (pickled / name).write_text((model_dir / name).read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert "only pickled weights" in refused(db, settings, pickled)

    remote_code = tmp_path / "remote-code"
    config = json.loads((model_dir / "config.json").read_text())
    tiny_model(remote_code, auto_map={"AutoModelForCausalLM": "modeling.Custom"})
    assert "auto_map" in refused(db, settings, remote_code)
    assert config["architectures"] == ["LlamaForCausalLM"]

    gguf_only = tmp_path / "gguf-only"
    gguf_only.mkdir()
    (gguf_only / "model.gguf").write_bytes(b"GGUF")
    assert "import the GGUF file" in refused(db, settings, gguf_only)

    assert "does not exist" in refused(db, settings, tmp_path / "nowhere")
    assert "longer than the model's own" in refused(
        db, settings, model_dir, options=parse_options({"context_length": 100_000})
    )
    assert "no registry version 99" in refused(
        db,
        settings,
        model_dir,
        options=parse_options({"speculative": {"method": "draft_model", "draft_version_id": 99}}),
    )


def test_a_served_name_must_be_a_model_name(db: Engine, settings: Settings, model_dir: Path) -> None:
    with Session(db) as session, pytest.raises(ImportRefused, match="served name"):
        import_model(session, settings, model_dir, "Bad Name", "alice")

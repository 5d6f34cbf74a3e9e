from pathlib import Path

import pytest

from appliance.engines.manifest import (
    CHAT_TEMPLATE_FILE,
    PREPARED_MARKER,
    ModelIntegrityError,
    load_manifest,
    load_manifests,
    sha256_file,
    verify_prepared,
    write_chat_template,
)
from appliance.settings import REPO_ROOT

MODELS = REPO_ROOT / "models"


def test_bundled_manifests_load_with_weights_hashes() -> None:
    manifests = load_manifests(MODELS, ["smollm2-135m-instruct", "minilm-l6-v2"])
    assert [m.runner for m in manifests] == ["generate", "pooling"]
    for manifest in manifests:
        assert all(len(digest) == 64 for digest in manifest.weights.values())
    assert manifests[1].dimensions == 384


def test_manifest_naming_another_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.yaml").write_text((MODELS / "minilm-l6-v2" / "model.yaml").read_text())
    with pytest.raises(ModelIntegrityError, match="names model"):
        load_manifests(tmp_path, ["other"])


def test_invalid_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("name: x\nrunner: dance\n")
    with pytest.raises(ModelIntegrityError, match="invalid model manifest"):
        load_manifest(path)


def prepared(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "minilm-l6-v2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(content)
    (folder / PREPARED_MARKER).write_text("ok")
    return folder


def test_weights_matching_the_manifest_verify(tmp_path: Path) -> None:
    folder = prepared(tmp_path, b"weights")
    manifest = load_manifest(MODELS / "minilm-l6-v2" / "model.yaml").model_copy(
        update={"weights": {"model.safetensors": sha256_file(folder / "model.safetensors")}}
    )
    verify_prepared(manifest, folder)


def test_altered_missing_or_unfinished_weights_are_refused(tmp_path: Path) -> None:
    manifest = load_manifest(MODELS / "minilm-l6-v2" / "model.yaml")
    folder = prepared(tmp_path, b"not the real weights")
    with pytest.raises(ModelIntegrityError, match="sha256"):
        verify_prepared(manifest, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        verify_prepared(manifest, folder)
    (folder / PREPARED_MARKER).unlink()
    with pytest.raises(ModelIntegrityError, match="not prepared"):
        verify_prepared(manifest, folder)


def test_the_chat_model_declares_its_tool_parser_and_a_template_that_renders_tools() -> None:
    manifest = load_manifest(MODELS / "smollm2-135m-instruct" / "model.yaml")
    assert manifest.tool_call_parser == "hermes"
    assert manifest.chat_template is not None and "<tool_call>" in manifest.chat_template


def test_the_manifest_template_replaces_the_prepared_one_and_is_verified(tmp_path: Path) -> None:
    folder = prepared(tmp_path, b"weights")
    manifest = load_manifest(MODELS / "minilm-l6-v2" / "model.yaml").model_copy(
        update={"weights": {"model.safetensors": sha256_file(folder / "model.safetensors")}, "chat_template": "{{ x }}"}
    )
    (folder / CHAT_TEMPLATE_FILE).write_text("the weights' own template")
    with pytest.raises(ModelIntegrityError, match="template"):
        verify_prepared(manifest, folder)
    write_chat_template(manifest, folder)
    assert (folder / CHAT_TEMPLATE_FILE).read_text() == "{{ x }}"
    verify_prepared(manifest, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CHAT_TEMPLATE_FILE, PREPARED_MARKER, "model.safetensors"]
    )


def test_a_parser_name_that_is_not_a_plain_word_is_refused(tmp_path: Path) -> None:
    text = (MODELS / "smollm2-135m-instruct" / "model.yaml").read_text()
    path = tmp_path / "model.yaml"
    path.write_text(text.replace("tool_call_parser: hermes", "tool_call_parser: 'hermes --trust-remote-code'"))
    with pytest.raises(ModelIntegrityError, match="tool_call_parser"):
        load_manifest(path)

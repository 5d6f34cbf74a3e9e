"""Offline media built from local artifacts, verified, and refused when anything differs."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.media import signing
from appliance.media.bundle import MANIFEST, SIGNATURE, MediaBuilder, MediaError, parse_component, verify_media


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    signing.generate(folder / "key.pem", folder / "key.pub.pem")
    return folder / "key.pem", folder / "key.pub.pem"


def model(folder: Path) -> tuple[Path, Path]:
    """A prepared model folder and its model.yaml (weights hash recorded)."""
    prepared = folder / "prepared" / "tiny"
    prepared.mkdir(parents=True)
    (prepared / "model.safetensors").write_bytes(b"weights" * 100)
    (prepared / "config.json").write_text("{}")
    digest = hashlib.sha256(b"weights" * 100).hexdigest()
    manifest = folder / "models" / "tiny" / "model.yaml"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(
        "name: tiny\nrunner: generate\nformat: hf\ncontext_length: 128\n"
        f"source: {{package: tiny-weights, version: 1.2.3, path: x}}\nweights: {{model.safetensors: {digest}}}\n"
    )
    return manifest, prepared


def wheel(folder: Path, name: str = "demo", version: str = "0.1.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
    return path


@pytest.fixture
def media(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    manifest, prepared = model(tmp_path)
    wheel(tmp_path / "wheels")
    playbooks = tmp_path / "playbooks"
    (playbooks / "roles" / "base").mkdir(parents=True)
    (playbooks / "site.yml").write_text("- hosts: all\n")
    (playbooks / "roles" / "base" / "main.yml").write_text("---\n")
    qdrant = tmp_path / "qdrant"
    qdrant.write_bytes(b"\x7fELF binary")
    builder = MediaBuilder(tmp_path / "media", "cpu")
    builder.add_wheels(tmp_path / "wheels", "local:wheels")
    builder.add_model(manifest, prepared)
    builder.add_tree(playbooks, "playbooks", "playbooks", "0.1.0", "repository")
    builder.add_component(parse_component(f"qdrant={qdrant}@1.15.0"))
    builder.finish(keys[0], "0.1.0")
    return tmp_path / "media"


def test_the_manifest_lists_every_file_with_its_origin(media: Path, keys: tuple[Path, Path]) -> None:
    manifest = verify_media(media, keys[1])
    by_path = {item["path"]: item for item in manifest["files"]}
    assert set(by_path) == {
        "wheels/demo-0.1.0-py3-none-any.whl",
        "models/tiny/model.yaml",
        "models/tiny/model.safetensors",
        "models/tiny/config.json",
        "playbooks/site.yml",
        "playbooks/roles/base/main.yml",
        "components/qdrant/qdrant",
    }
    wheel_entry = by_path["wheels/demo-0.1.0-py3-none-any.whl"]
    assert (wheel_entry["component"], wheel_entry["version"], wheel_entry["origin"]) == (
        "wheel:demo",
        "0.1.0",
        "local:wheels",
    )
    weights = by_path["models/tiny/model.safetensors"]
    assert (weights["component"], weights["version"], weights["origin"]) == (
        "model:tiny",
        "1.2.3",
        "package:tiny-weights",
    )
    assert weights["size"] == 700 and weights["sha256"] == hashlib.sha256(b"weights" * 100).hexdigest()
    assert by_path["components/qdrant/qdrant"]["version"] == "1.15.0"
    assert manifest["profile"] == "cpu" and manifest["format"] == 1


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("flip", "models/tiny/model.safetensors does not match its sha256"),
        ("truncate", "models/tiny/config.json is 0 bytes"),
        ("missing", "playbooks/site.yml is missing"),
        ("extra", "wheels/evil-6.6.6-py3-none-any.whl is not in the manifest"),
        ("resign", "signature does not match"),
        ("edit-manifest", "signature does not match"),
        ("no-signature", "is not install media"),
    ],
)
def test_tampering_is_refused_naming_what_differs(
    media: Path, keys: tuple[Path, Path], tmp_path: Path, tamper: str, message: str
) -> None:
    if tamper == "flip":
        path = media / "models/tiny/model.safetensors"
        data = bytearray(path.read_bytes())
        data[10] ^= 0x01
        path.write_bytes(bytes(data))
    elif tamper == "truncate":
        (media / "models/tiny/config.json").write_bytes(b"")
    elif tamper == "missing":
        (media / "playbooks/site.yml").unlink()
    elif tamper == "extra":
        wheel(media / "wheels", "evil", "6.6.6")
    elif tamper == "resign":
        other = tmp_path / "other"
        other.mkdir()
        signing.generate(other / "k.pem", other / "k.pub.pem")
        (media / SIGNATURE).write_bytes(signing.sign((media / MANIFEST).read_bytes(), other / "k.pem"))
    elif tamper == "edit-manifest":
        manifest = json.loads((media / MANIFEST).read_text())
        manifest["files"][0]["sha256"] = "0" * 64
        (media / MANIFEST).write_text(json.dumps(manifest))
    elif tamper == "no-signature":
        (media / SIGNATURE).unlink()
    with pytest.raises(MediaError, match=message.replace("(", r"\(")):
        verify_media(media, keys[1])


def test_a_model_whose_weights_differ_from_its_manifest_is_not_bundled(tmp_path: Path) -> None:
    manifest, prepared = model(tmp_path)
    (prepared / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(MediaError, match="does not match the sha256"):
        MediaBuilder(tmp_path / "media", "cpu").add_model(manifest, prepared)
    with pytest.raises(MediaError, match="not empty"):
        MediaBuilder(tmp_path / "media", "cpu")
    with pytest.raises(MediaError, match="NAME=PATH"):
        parse_component("no-equals-sign")


def test_the_command_builds_and_verifies(
    tmp_path: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`appliance media build` with the appliance's own wheel built here, then `appliance media verify`."""
    manifest, prepared = model(tmp_path)
    monkeypatch.setenv("APPLIANCE_MODELS_DIR", str(manifest.parent.parent))
    monkeypatch.setenv("APPLIANCE_MODELS_CACHE_DIR", str(prepared.parent))
    monkeypatch.setenv("APPLIANCE_DATA_DIR", str(tmp_path / "data"))
    from appliance.settings import get_settings

    get_settings.cache_clear()
    try:
        out = tmp_path / "media"
        assert (
            main(
                [
                    "media",
                    "build",
                    "--out",
                    str(out),
                    "--signing-key",
                    str(keys[0]),
                    "--wheels",
                    str(wheel(tmp_path / "w").parent),
                ]
            )
            == 0
        )
        built = json.loads(capsys.readouterr().out)
        assert built["models"] == ["tiny"] and built["files"] >= 5
        assert any(p.name.startswith("appliance-") for p in (out / "wheels").iterdir())
        assert main(["media", "verify", str(out), "--pubkey", str(keys[1]), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["ok"] is True
        shutil.copy(out / "wheels" / "demo-0.1.0-py3-none-any.whl", out / "wheels" / "copy.whl")
        assert main(["media", "verify", str(out), "--pubkey", str(keys[1])]) == 2
        assert "wheels/copy.whl is not in the manifest" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()

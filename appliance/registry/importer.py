"""Importing a model version from a local folder (Hugging Face layout) or a GGUF file, refusing with a specific
reason what the engine cannot serve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, select

from appliance.engines.runner import engine_python, offline_env
from appliance.lib.errors import InvalidRequestError
from appliance.registry import service
from appliance.registry.files import (
    context_length_of,
    dtype_of,
    file_records,
    read_config,
    safetensors_parameters,
)
from appliance.registry.models import IMPORTED, RETIRED, ModelTransition, ModelVersion
from appliance.registry.options import EngineFacts, ServingOptions, check_options
from appliance.settings import Settings

PROBE = Path(__file__).with_name("probe.py")
SERVED_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,62}$")
PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
CODE_FILES = (".py", ".pyc", ".so")
POOLING_SUFFIXES = ("Model", "ForSequenceClassification", "ForEmbedding")


class ImportRefused(InvalidRequestError):
    """The model cannot be imported; the message says why."""

    code = "model_refused"


def probe(settings: Settings, *args: str, timeout: float = 600.0) -> str:
    """Run probe.py with the engines' Python, offline; its stdout."""
    result = subprocess.run(
        [str(engine_python(settings)), str(PROBE), *args],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ImportRefused(f"the engine's Python failed on `probe {args[0]}`: {result.stderr.strip()[-2000:]}")
    return result.stdout


def engine_facts(settings: Settings, model_dir: Path | None = None) -> tuple[EngineFacts, dict[str, Any]]:
    """What the engine environment supports (and, with ``model_dir``, whether it has that model's architecture)."""
    data = json.loads(probe(settings, "facts", *([str(model_dir)] if model_dir else [])).strip().splitlines()[-1])
    return EngineFacts.from_probe(data), data


def _copy_hf(source: Path, staging: Path) -> None:
    """The folder's files, less code and pickles (they can run code when loaded) and hidden files."""
    has_safetensors = any(source.rglob("*.safetensors"))
    pickles = [p for p in source.rglob("*") if p.is_file() and p.suffix in PICKLES]
    if pickles and not has_safetensors:
        raise ImportRefused(
            f"{source} has only pickled weights ({pickles[0].name}): they can run code when loaded; "
            "convert them to safetensors first"
        )
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        if not path.is_file() or path.suffix in PICKLES or path.suffix in CODE_FILES:
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)


def _readable_by_group(folder: Path) -> None:
    """Files 0640 and folders 0750 whatever modes they were copied with: on a node the engines' user reads a
    version through the registry folder's group (set-group-id, so the group is inherited), and nobody else."""
    for path in (folder, *folder.rglob("*")):
        path.chmod(0o2750 if path.is_dir() else 0o640)


def _check_layout(folder: Path, config: dict[str, Any]) -> None:
    if not any(folder.rglob("*.safetensors")):
        raise ImportRefused("no safetensors weights in the folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ImportRefused(f"no tokenizer in the folder (one of {', '.join(TOKENIZER_FILES)})")
    if config.get("auto_map"):
        raise ImportRefused("config.json needs the model's own Python code (auto_map): not served (trust_remote_code)")
    if not config.get("architectures"):
        raise ImportRefused("config.json names no architecture")


def check_draft(session: Session, options: ServingOptions) -> Path | None:
    """The draft model's folder where the options name one: a registry version that is not retired."""
    if options.speculative is None or options.speculative.draft_version_id is None:
        return None
    draft = session.get(ModelVersion, options.speculative.draft_version_id)
    if draft is None:
        raise ImportRefused(f"draft model: no registry version {options.speculative.draft_version_id}")
    if draft.state == RETIRED or draft.files_removed:
        raise ImportRefused(f"draft model {draft.served_name} v{draft.version} is retired")
    return Path(draft.path)


def import_model(
    session: Session,
    settings: Settings,
    source: Path,
    served_name: str,
    actor: str,
    options: ServingOptions | None = None,
    *,
    runner: str | None = None,
    engine_kind: str = "vllm",
) -> ModelVersion:
    """Copy (or convert) ``source`` into the registry as the next version of ``served_name``, state imported."""
    options = options or ServingOptions()
    if not SERVED_NAME.match(served_name):
        raise ImportRefused(f"served name {served_name!r}: lowercase letters, digits, '.' and '-' (2-63)")
    if engine_kind != "vllm" and engine_kind not in settings.registry.engine_kinds:
        raise ImportRefused(f"unknown engine kind {engine_kind!r}")
    source = source.resolve()
    if not source.exists():
        raise ImportRefused(f"{source} does not exist")
    settings.registry_dir.mkdir(parents=True, exist_ok=True)
    staging = settings.registry_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        if source.is_file() and source.suffix == ".gguf":
            source_format = "gguf"
            probe(settings, "convert", str(source), str(staging / "model"), timeout=3600)
            for path in (staging / "model").iterdir():
                path.rename(staging / path.name)
            (staging / "model").rmdir()
        elif source.is_dir():
            source_format = "hf"
            if not (source / "config.json").is_file():
                ggufs = sorted(source.glob("*.gguf"))
                hint = f" (import the GGUF file {ggufs[0]} instead)" if ggufs else ""
                raise ImportRefused(f"{source} has no config.json{hint}")
            _copy_hf(source, staging)
        else:
            raise ImportRefused(f"{source} is neither a model folder nor a .gguf file")
        config = read_config(staging)
        _check_layout(staging, config)
        facts, probed = engine_facts(settings, staging)
        architecture = probed.get("supported_architecture")
        if engine_kind == "vllm" and not architecture:
            raise ImportRefused(
                f"vLLM cannot serve architecture {', '.join(config['architectures'])}: "
                "it is not in this engine's model registry"
            )
        architecture = architecture or config["architectures"][0]
        context_length = context_length_of(config)
        if context_length is None:
            raise ImportRefused("config.json gives no context length (max_position_embeddings or the like)")
        if engine_kind == "vllm":
            check_options(options, facts, context_length)
        check_draft(session, options)
        if runner is None:
            runner = "generate" if not architecture.endswith(POOLING_SUFFIXES) else "pooling"
        params = sum(safetensors_parameters(path) for path in staging.rglob("*.safetensors"))
        records = file_records(staging)
        version = (
            session.exec(select(func.max(ModelVersion.version)).where(ModelVersion.served_name == served_name)).one()
            or 0
        ) + 1
        target = settings.registry_dir / served_name / f"v{version}"
        target.parent.mkdir(parents=True, exist_ok=True)
        _readable_by_group(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    row = ModelVersion(
        served_name=served_name,
        version=version,
        source=str(source),
        source_format=source_format,
        path=str(target),
        runner=runner,
        engine_kind=engine_kind,
        architecture=architecture,
        context_length=context_length,
        dtype=dtype_of(config),
        param_count=params,
        files=records,
        options=options.model_dump(exclude_none=True),
        imported_by=actor,
    )
    session.add(row)
    try:
        session.flush()
        assert row.id is not None
        session.add(ModelTransition(version_id=row.id, action="import", to_state=IMPORTED, actor=actor))
        session.commit()
    except Exception:
        session.rollback()
        shutil.rmtree(target, ignore_errors=True)
        raise
    session.refresh(row)
    service.audit(settings, "import", row, actor, source=str(source))
    return row

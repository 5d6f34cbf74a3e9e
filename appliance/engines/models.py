"""Preparing the bundled models offline (idempotent), and refusing to serve weights that do not verify."""

from __future__ import annotations

import fcntl
import logging
import subprocess
from pathlib import Path

from appliance.engines.manifest import (
    MANIFEST_FILE,
    PREPARED_MARKER,
    ModelIntegrityError,
    ModelManifest,
    verify_prepared,
    write_chat_template,
)
from appliance.engines.runner import offline_env
from appliance.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

PREPARE_SCRIPT = REPO_ROOT / "models" / "prepare.py"


def ensure_prepared(manifest: ModelManifest, settings: Settings, python: Path) -> Path:
    """The verified folder of ``manifest``'s model; prepares it first when missing or not matching.

    Holds a lock on the models folder meanwhile: several appliances (a `make run`, a test session) may
    share one folder, and only one of them prepares a model at a time."""
    settings.prepared_models_dir.mkdir(parents=True, exist_ok=True)
    with (settings.prepared_models_dir / ".prepare.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_prepared(manifest, settings, python)


def _ensure_prepared(manifest: ModelManifest, settings: Settings, python: Path) -> Path:
    target = settings.prepared_models_dir / manifest.name
    try:
        if (target / PREPARED_MARKER).is_file():
            # A template change alone needs no new conversion; the weights are verified next.
            write_chat_template(manifest, target)
        verify_prepared(manifest, target)
        log.info("model %s: prepared weights verified in %s", manifest.name, target)
        return target
    except ModelIntegrityError as exc:
        log.info("model %s: preparing (%s)", manifest.name, exc.message)
    result = subprocess.run(
        [
            str(python),
            str(PREPARE_SCRIPT),
            str(settings.models_dir / manifest.name / MANIFEST_FILE),
            str(target),
        ],
        env=offline_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ModelIntegrityError(
            f"preparing model {manifest.name} failed (exit {result.returncode}):\n{result.stderr[-4000:]}"
        )
    verify_prepared(manifest, target)
    log.info("model %s: prepared and verified in %s", manifest.name, target)
    return target

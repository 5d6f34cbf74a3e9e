"""The two ends of a node's registry engines (see :mod:`appliance.registry.launch`): ``reconcile``, run as root by
``appliance-registry.service`` when the unit specs change, and ``exec_engine``, the ``ExecStart`` of each
``vllm-registry@<name>`` unit, run as the engines' user. Neither touches the database."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from appliance.engines.runner import engine_command, engine_env, engine_python
from appliance.registry.files import verify_files
from appliance.registry.launch import UNIT_TEMPLATE, UnitSpec, UnitSpecError, units_dir
from appliance.settings import Settings

log = logging.getLogger(__name__)

UNIT_GLOB = "vllm-registry@*.service"


def exec_engine(settings: Settings, name: str) -> None:
    """Verify the version's files, then replace this process with its engine. Raises (the unit fails) when the
    spec is missing, refused, or a file changed since import."""
    path = units_dir(settings) / f"{name}.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UnitSpecError(f"no unit spec {path}: the engine is not deployed") from None
    unit = UnitSpec.from_json(text, settings)
    if unit.spec.name != name:
        raise UnitSpecError(f"{path} describes engine {unit.spec.name!r}, not {name!r}")
    verify_files(unit.spec.model_dir, unit.files, f"engine {name}")  # before every start, restarts included
    command = engine_command(unit.spec, engine_python(settings), settings)
    env = engine_env(settings, unit.spec, unit.index)
    os.execve(command[0], command, env)  # noqa: S606 (the engines' own Python, from the settings)


def deployed_units(settings: Settings) -> list[tuple[str, str | None]]:
    """(unit, health URL) of each registry engine deployed on this node, for ``appliance status`` (none where
    this user may not read the specs)."""
    found: list[tuple[str, str | None]] = []
    for name, text in _specs(settings):
        try:
            unit = UnitSpec.from_json(text, settings)
        except UnitSpecError:
            continue
        found.append((UNIT_TEMPLATE.format(name=name), unit.spec.url + "/health"))
    return found


def _specs(settings: Settings) -> list[tuple[str, str]]:
    """(name, text) of every unit spec on disk that can be read now."""
    folder = units_dir(settings)
    specs = []
    try:
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    except OSError:
        return []
    for path in paths:
        try:
            specs.append((path.stem, path.read_text()))
        except OSError:  # removed while we read, or not ours to read
            continue
    return specs


@dataclass(frozen=True)
class Plan:
    """What reconciling does: units to start (or restart: their spec changed) and units to stop."""

    start: dict[str, str]  # name -> the spec's digest
    stop: list[str]


def plan(wanted: dict[str, str], applied: dict[str, str], present: set[str]) -> Plan:
    """``wanted``: name -> digest of each spec on disk; ``applied``: what the last reconcile started;
    ``present``: the registry units systemd knows (enabled or running)."""
    start = {name: digest for name, digest in wanted.items() if applied.get(name) != digest or name not in present}
    stop = sorted((present | set(applied)) - set(wanted))
    return Plan(start=start, stop=stop)


def wanted_units(settings: Settings) -> dict[str, str]:
    """name -> sha256 of each acceptable unit spec on disk (a refused one is logged and left out)."""
    wanted: dict[str, str] = {}
    for name, text in _specs(settings):
        try:
            UnitSpec.from_json(text, settings)
        except UnitSpecError as exc:
            log.error("the unit spec of %s is refused: %s", name, exc)
            continue
        wanted[name] = hashlib.sha256(text.encode()).hexdigest()
    return wanted


def reconcile(settings: Settings, state_file: Path) -> Plan:
    """Bring the ``vllm-registry@`` units in line with the specs: start (and enable) the new and the changed,
    stop (and disable) the removed. ``state_file`` keeps the digests of what was started. A change made while
    this runs does not re-trigger it (systemd merges the path unit's start into the running job), so it runs
    again until the specs stayed as they were for a whole pass."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise UnitSpecError("systemctl is not on this machine")
    done = Plan(start={}, stop=[])
    for _ in range(10):
        wanted = wanted_units(settings)
        actions = _apply(systemctl, wanted, state_file)
        done = Plan(start={**done.start, **actions.start}, stop=sorted({*done.stop, *actions.stop}))
        if wanted_units(settings) == wanted:
            break
    return done


def _apply(systemctl: str, wanted: dict[str, str], state_file: Path) -> Plan:
    try:
        applied = json.loads(state_file.read_text())
    except (OSError, ValueError):
        applied = {}
    listed = subprocess.run(
        [systemctl, "list-units", "--all", "--plain", "--no-legend", "--no-pager", UNIT_GLOB],
        capture_output=True,
        text=True,
        check=False,
    )
    enabled = Path("/etc/systemd/system/multi-user.target.wants")
    present = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    present |= {path.name for path in enabled.glob(UNIT_GLOB)} if enabled.is_dir() else set()
    names = {unit.removeprefix("vllm-registry@").removesuffix(".service") for unit in present}
    actions = plan(wanted, applied, names)
    for name in actions.stop:
        _systemctl(systemctl, "disable", "--now", UNIT_TEMPLATE.format(name=name))
        applied.pop(name, None)
    for name, digest in actions.start.items():
        unit = UNIT_TEMPLATE.format(name=name)
        _systemctl(systemctl, "enable", unit)
        _systemctl(systemctl, "restart", "--no-block", unit)  # the deploying process waits for its health
        applied[name] = digest
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(applied, sort_keys=True))
    return actions


def _systemctl(systemctl: str, *args: str) -> None:
    result = subprocess.run([systemctl, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        log.error("systemctl %s failed: %s", " ".join(args), result.stderr.strip())
    else:
        log.info("systemctl %s", " ".join(args))

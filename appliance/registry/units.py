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
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from appliance.engines.runner import engine_command, engine_env, engine_python
from appliance.registry.files import verify_files
from appliance.registry.launch import UNIT_TEMPLATE, UnitSpec, UnitSpecError, read_spec, units_dir
from appliance.settings import Settings

log = logging.getLogger(__name__)

UNIT_GLOB = "vllm-registry@*.service"
EXIT_REFUSED = 78  # EX_CONFIG: the unit's RestartPreventExitStatus


def exec_engine(settings: Settings, name: str) -> None:
    """Verify the version's files, then replace this process with its engine. Raises (the unit fails, and is
    not restarted: ``EXIT_REFUSED``) when the spec is missing or refused, or a file changed since import."""
    unit = UnitSpec.from_json(read_spec(units_dir(settings) / f"{name}.json"), settings, name)
    verify_files(unit.spec.model_dir, unit.files, f"engine {name}")  # before every start, restarts included
    command = engine_command(unit.spec, engine_python(settings), settings)
    env = engine_env(settings, unit.spec, unit.index)
    os.execve(command[0], command, env)  # noqa: S606 (the engines' own Python, from the settings)


def deployed_units(settings: Settings) -> list[tuple[str, str | None]]:
    """(unit, health URL) of each registry engine deployed on this node, for ``appliance status`` (none where
    this user may not read the specs)."""
    found: list[tuple[str, str | None]] = []
    for name, text in _specs(settings).items():
        try:
            if isinstance(text, UnitSpecError):
                raise text
            unit = UnitSpec.from_json(text, settings, name)
        except UnitSpecError:
            continue
        found.append((UNIT_TEMPLATE.format(name=name), unit.spec.url + "/health"))
    return found


def _specs(settings: Settings) -> dict[str, str | UnitSpecError]:
    """name -> text of every unit spec on disk, or why it cannot be read (a link, not a file, too large...)."""
    folder = units_dir(settings)
    try:
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    except OSError:
        return {}
    specs: dict[str, str | UnitSpecError] = {}
    for path in paths:
        try:
            specs[path.stem] = read_spec(path)
        except UnitSpecError as exc:
            if path.exists() or path.is_symlink():  # not merely removed while we read
                specs[path.stem] = exc
    return specs


@dataclass(frozen=True)
class Plan:
    """What reconciling does: units to start (or restart: their spec changed) and units to stop."""

    start: dict[str, str]  # name -> the spec's digest
    stop: list[str]


def plan(wanted: dict[str, str], applied: dict[str, str], present: set[str], refused: Collection[str] = ()) -> Plan:
    """``wanted``: name -> digest of each spec on disk; ``applied``: what the last reconcile started;
    ``present``: the registry units systemd knows (enabled or running); ``refused``: specs on disk that cannot be
    read or are refused now (a settings change, a bad file): their units are left as they are, neither started
    nor stopped, so a deployed model is not taken down by a mistake that can be put right."""
    start = {name: digest for name, digest in wanted.items() if applied.get(name) != digest or name not in present}
    stop = sorted((present | set(applied)) - set(wanted) - set(refused))
    return Plan(start=start, stop=stop)


def wanted_units(settings: Settings) -> tuple[dict[str, str], set[str]]:
    """(name -> sha256 of each acceptable unit spec on disk, names of the specs refused: logged)."""
    wanted: dict[str, str] = {}
    refused: set[str] = set()
    for name, text in _specs(settings).items():
        try:
            if isinstance(text, UnitSpecError):
                raise text
            UnitSpec.from_json(text, settings, name)
        except UnitSpecError as exc:
            log.error("the unit spec of %s is refused (its unit is left as it is): %s", name, exc.message)
            refused.add(name)
            continue
        wanted[name] = hashlib.sha256(text.encode()).hexdigest()
    return wanted, refused


def reconcile(settings: Settings, state_file: Path) -> Plan:
    """Bring the ``vllm-registry@`` units in line with the specs: start (and enable) the new and the changed,
    stop (and disable) the removed. ``state_file`` keeps the digests of what was started. The path unit does not
    watch while this runs, so this runs again until the specs stayed as they were for a whole pass (and a timer
    runs it every 30 s besides)."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise UnitSpecError("systemctl is not on this machine")
    done = Plan(start={}, stop=[])
    for _ in range(10):
        wanted, refused = wanted_units(settings)
        actions = _apply(systemctl, wanted, refused, state_file)
        done = Plan(start={**done.start, **actions.start}, stop=sorted({*done.stop, *actions.stop}))
        if wanted_units(settings) == (wanted, refused):
            break
    return done


def _apply(systemctl: str, wanted: dict[str, str], refused: set[str], state_file: Path) -> Plan:
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
    actions = plan(wanted, applied, names, refused)
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

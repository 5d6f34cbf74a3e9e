"""How a deployed version's engines are started and stopped: by the process that deploys them (the development
layout, watched by ``appliance up``'s supervisor), or by systemd on a node (``server.service_manager =
"systemd"``), where the appliance's unprivileged user cannot start units itself.

On a node the deploying process writes one *unit spec* per engine into ``<registry dir>/units/`` and removes it to
stop the engine. A root path unit (``appliance-registry.path``, installed by the playbooks) runs
``appliance engines reconcile`` whenever that folder changes: it enables and starts ``vllm-registry@<name>``
for each spec, restarts one whose spec changed, and stops and disables the units whose spec is gone. Each unit
runs ``appliance engines exec-registry <name>`` as the engines' user: the spec's files are verified against
their recorded sha256 before every start, then the command is built by the same code as every other engine.
systemd restarts a crashed engine and starts the deployed ones again after a reboot."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.engines.manifest import ModelManifest
from appliance.engines.runner import EngineSpec, pid_alive, stop_group, wait_healthy
from appliance.lib.errors import ApplianceError
from appliance.settings import EngineKind, Settings

log = logging.getLogger(__name__)

UNIT_TEMPLATE = "vllm-registry@{name}.service"


class UnitSpecError(ApplianceError):
    code = "unit_spec_invalid"


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """What a node's ``vllm-registry@<name>`` unit starts: one engine of one version, with the files to verify."""

    spec: EngineSpec
    index: int
    files: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "vllm"

    def to_json(self) -> str:
        spec = self.spec
        return json.dumps(
            {
                "name": spec.name,
                "manifest": spec.manifest.model_dump(mode="json"),
                "model_dir": str(spec.model_dir),
                "host": spec.host,
                "port": spec.port,
                "args": list(spec.args),
                "env": dict(spec.env),
                "index": self.index,
                "files": self.files,
                "kind": self.kind,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, settings: Settings) -> UnitSpec:
        """Read back a spec, refusing one that would start anything but a registry version's vLLM engine."""
        try:
            raw = json.loads(text)
            manifest = ModelManifest.model_validate(raw["manifest"])
            spec = EngineSpec(
                manifest=manifest,
                model_dir=Path(raw["model_dir"]),
                host=str(raw["host"]),
                port=int(raw["port"]),
                log_path=Path("/dev/null"),  # systemd's journal has the engine's output
                name=str(raw["name"]),
                args=tuple(str(arg) for arg in raw["args"]),
                env=tuple((str(k), str(v)) for k, v in dict(raw["env"]).items()),
            )
            unit = cls(spec=spec, index=int(raw["index"]), files=list(raw["files"]), kind=str(raw["kind"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise UnitSpecError(f"unreadable unit spec: {exc}") from None
        registry = settings.registry_dir.resolve()
        if unit.kind != "vllm":
            raise UnitSpecError(f"engine kind {unit.kind!r}: a node's units start vLLM engines only")
        if not spec.model_dir.resolve().is_relative_to(registry):
            raise UnitSpecError(f"{spec.model_dir} is not a registry version's folder ({registry})")
        if spec.host != settings.engines.host:
            raise UnitSpecError(f"host {spec.host!r}: engines listen on {settings.engines.host} only")
        first, count = settings.registry.port_base, settings.registry.port_count
        if not first <= spec.port < first + count:
            raise UnitSpecError(f"port {spec.port} is outside the registry's ports {first}-{first + count - 1}")
        return unit


def units_dir(settings: Settings) -> Path:
    return settings.registry_dir / "units"


class Launcher(Protocol):
    """Starts a version's engines and stops them again; ``engines`` rows are what ``served_models`` records."""

    def start(
        self, specs: list[EngineSpec], kind_name: str, kind: EngineKind, files: list[dict[str, Any]], what: str
    ) -> list[dict[str, Any]]: ...

    def stop(self, engines: list[dict[str, Any]]) -> None: ...

    def alive(self, engine: dict[str, Any]) -> bool: ...


@dataclass
class ProcessLauncher:
    """The development layout: engines are child processes in their own process groups."""

    settings: Settings
    spawn: Callable[[Settings, EngineSpec, str, int], subprocess.Popen[bytes]]

    def start(
        self, specs: list[EngineSpec], kind_name: str, kind: EngineKind, files: list[dict[str, Any]], what: str
    ) -> list[dict[str, Any]]:
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for index, spec in enumerate(specs):
                processes.append(self.spawn(self.settings, spec, kind_name, index))
            deadline = time.monotonic() + self.settings.engines.startup_timeout_s
            for spec, process in zip(specs, processes, strict=True):
                wait_healthy(
                    spec.url + kind.health_path,
                    max(1.0, deadline - time.monotonic()),
                    process,
                    what=f"engine {spec.name} (log: {spec.log_path})",
                )
        except BaseException:
            for process in processes:
                stop_group(process.pid, timeout_s=10)
            raise
        return [
            {"name": spec.name, "url": spec.url, "port": spec.port, "pid": process.pid}
            for spec, process in zip(specs, processes, strict=True)
        ]

    def stop(self, engines: list[dict[str, Any]]) -> None:
        for engine in engines:
            if engine.get("pid"):
                stop_group(int(engine["pid"]), timeout_s=30)

    def alive(self, engine: dict[str, Any]) -> bool:
        return pid_alive(engine.get("pid"))


@dataclass
class UnitLauncher:
    """A node: engines are systemd units, started and stopped through their spec files (see the module)."""

    settings: Settings

    def start(
        self, specs: list[EngineSpec], kind_name: str, kind: EngineKind, files: list[dict[str, Any]], what: str
    ) -> list[dict[str, Any]]:
        folder = units_dir(self.settings)
        folder.mkdir(parents=True, exist_ok=True)
        written: list[EngineSpec] = []
        try:
            for index, spec in enumerate(specs):
                unit = UnitSpec(spec=spec, index=index, files=files, kind=kind_name)
                UnitSpec.from_json(unit.to_json(), self.settings)  # refused here, not by the unit
                _write_atomically(folder / f"{spec.name}.json", unit.to_json())
                written.append(spec)
            deadline = time.monotonic() + self.settings.engines.startup_timeout_s
            for spec in specs:
                wait_healthy(
                    spec.url + kind.health_path,
                    max(1.0, deadline - time.monotonic()),
                    what=f"engine {spec.name} (journalctl -u {UNIT_TEMPLATE.format(name=spec.name)})",
                )
        except BaseException:
            self.stop([{"name": spec.name} for spec in written])
            raise
        return [
            {"name": spec.name, "url": spec.url, "port": spec.port, "unit": UNIT_TEMPLATE.format(name=spec.name)}
            for spec in specs
        ]

    def stop(self, engines: list[dict[str, Any]]) -> None:
        for engine in engines:
            (units_dir(self.settings) / f"{engine['name']}.json").unlink(missing_ok=True)

    def alive(self, engine: dict[str, Any]) -> bool:
        return (units_dir(self.settings) / f"{engine['name']}.json").exists()


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    os.chmod(staging, 0o640)  # the engines' group reads it; nobody else
    os.replace(staging, path)

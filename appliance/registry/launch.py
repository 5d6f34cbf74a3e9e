"""How a deployed version's engines are started and stopped: by the process that deploys them (the development
layout, watched by ``appliance up``'s supervisor), or by systemd on a node (``server.service_manager =
"systemd"``), where the appliance's unprivileged user cannot start units itself.

On a node the deploying process writes one *unit spec* per engine into ``<registry dir>/units/`` and removes it to
stop the engine. A root path unit (``appliance-registry.path``, installed by the playbooks) runs
``appliance models units reconcile`` whenever that folder changes (and every 30 s, should a change
be missed): it enables and starts ``vllm-registry@<name>``
for each spec, restarts one whose spec changed, and stops and disables the units whose spec is gone. Each unit
runs ``appliance models units exec <name>`` as the engines' user: the spec's files are verified against
their recorded sha256 before every start, then the command is built by the same code as every other engine.
systemd restarts a crashed engine and starts the deployed ones again after a reboot."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.engines.manifest import ModelManifest
from appliance.engines.runner import EngineSpec, stop_group, wait_healthy
from appliance.lib.errors import ApplianceError
from appliance.registry.models import ModelVersion
from appliance.registry.options import parse_options, vllm_args
from appliance.settings import EngineKind, Settings

log = logging.getLogger(__name__)

UNIT_TEMPLATE = "vllm-registry@{name}.service"


class UnitSpecError(ApplianceError):
    code = "unit_spec_invalid"


NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,90}$")  # <served name>-v<N>[-<replica>]
MAX_SPEC_BYTES = 64 << 10


def gpu_node() -> bool:
    return shutil.which("nvidia-smi") is not None


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """What a node's ``vllm-registry@<name>`` unit starts: one engine of one version, with the files to verify.

    The spec carries the version's serving *options*, never vLLM arguments or environment: whoever reads it
    (root's reconcile, the unit as the engines' user) builds the command from the options with the same code as
    every engine, so a spec can only describe a registry version's vLLM engine on a registry port."""

    spec: EngineSpec
    index: int
    files: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "vllm"
    options: dict[str, Any] = field(default_factory=dict)
    draft_dir: Path | None = None

    def to_json(self) -> str:
        spec = self.spec
        return json.dumps(
            {
                "name": spec.name,
                "manifest": spec.manifest.model_dump(mode="json"),
                "model_dir": str(spec.model_dir),
                "host": spec.host,
                "port": spec.port,
                "index": self.index,
                "files": self.files,
                "kind": self.kind,
                "options": self.options,
                "draft_dir": str(self.draft_dir) if self.draft_dir else None,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, settings: Settings, name: str) -> UnitSpec:
        """Read back the spec of engine ``name``, refusing one that would start anything but a registry
        version's vLLM engine on a registry port."""
        if not NAME.match(name):
            raise UnitSpecError(f"{name!r} is not an engine name of the registry")
        try:
            raw = json.loads(text)
            manifest = ModelManifest.model_validate(raw["manifest"])
            draft_dir = Path(raw["draft_dir"]) if raw["draft_dir"] else None
            options = dict(raw["options"])
            engine_args = vllm_args(parse_options(options), gpu=gpu_node(), draft_dir=draft_dir)
            spec = EngineSpec(
                manifest=manifest,
                model_dir=Path(raw["model_dir"]),
                host=str(raw["host"]),
                port=int(raw["port"]),
                log_path=Path("/dev/null"),  # systemd's journal has the engine's output
                name=str(raw["name"]),
                args=engine_args.args,
                env=tuple(engine_args.env.items()),
            )
            unit = cls(
                spec=spec,
                index=int(raw["index"]),
                files=list(raw["files"]),
                kind=str(raw["kind"]),
                options=options,
                draft_dir=draft_dir,
            )
        except (ValueError, KeyError, TypeError, ApplianceError) as exc:
            message = exc.message if isinstance(exc, ApplianceError) else type(exc).__name__
            raise UnitSpecError(f"unreadable unit spec: {message}") from None
        if spec.name != name or not name.startswith(f"{manifest.name}-v"):
            raise UnitSpecError(f"the spec of {name!r} describes engine {spec.name!r} of {manifest.name!r}")
        registry = settings.registry_dir.resolve()
        if unit.kind != "vllm":
            raise UnitSpecError(f"engine kind {unit.kind!r}: a node's units start vLLM engines only")
        for folder in (spec.model_dir, *([draft_dir] if draft_dir else [])):
            if not folder.resolve().is_relative_to(registry):
                raise UnitSpecError(f"{folder} is not a registry version's folder ({registry})")
        if spec.host != settings.engines.host:
            raise UnitSpecError(f"host {spec.host!r}: engines listen on {settings.engines.host} only")
        first, count = settings.registry.port_base, settings.registry.port_count
        if not first <= spec.port < first + count:
            raise UnitSpecError(f"port {spec.port} is outside the registry's ports {first}-{first + count - 1}")
        return unit


def read_spec(path: Path) -> str:
    """A spec file's text: a regular file of at most 64 KiB, not followed through a link, never blocking (root
    reads this folder, which the appliance's user writes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise UnitSpecError(f"{path.name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SPEC_BYTES:
            raise UnitSpecError(f"{path.name} is not a regular file of at most {MAX_SPEC_BYTES} bytes")
        try:
            return handle.read(MAX_SPEC_BYTES + 1).decode("utf-8")
        except UnicodeDecodeError:
            raise UnitSpecError(f"{path.name} is not UTF-8") from None


def units_dir(settings: Settings) -> Path:
    return settings.registry_dir / "units"


class Launcher(Protocol):
    """Starts a version's engines and stops them again; ``engines`` rows are what ``served_models`` records."""

    def start(
        self, specs: list[EngineSpec], version: ModelVersion, kind: EngineKind, draft_dir: Path | None
    ) -> list[dict[str, Any]]: ...

    def stop(self, engines: list[dict[str, Any]]) -> None: ...


@dataclass
class ProcessLauncher:
    """The development layout: engines are child processes in their own process groups."""

    settings: Settings
    spawn: Callable[[Settings, EngineSpec, str, int], subprocess.Popen[bytes]]

    def start(
        self,
        specs: list[EngineSpec],
        version: ModelVersion,
        kind: EngineKind,
        draft_dir: Path | None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Start the engines and wait for their health (returns early once ``cancelled()``); stops them all if
        one fails."""
        processes: list[subprocess.Popen[bytes]] = []
        try:
            for index, spec in enumerate(specs):
                processes.append(self.spawn(self.settings, spec, version.engine_kind, index))
            deadline = time.monotonic() + self.settings.engines.startup_timeout_s
            for spec, process in zip(specs, processes, strict=True):
                wait_healthy(
                    spec.url + kind.health_path,
                    max(1.0, deadline - time.monotonic()),
                    process,
                    what=f"engine {spec.name} (log: {spec.log_path})",
                    cancelled=cancelled,
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


@dataclass
class UnitLauncher:
    """A node: engines are systemd units, started and stopped through their spec files (see the module)."""

    settings: Settings

    def start(
        self, specs: list[EngineSpec], version: ModelVersion, kind: EngineKind, draft_dir: Path | None
    ) -> list[dict[str, Any]]:
        folder = units_dir(self.settings)
        folder.mkdir(parents=True, exist_ok=True)
        written: list[EngineSpec] = []
        try:
            for index, spec in enumerate(specs):
                unit = UnitSpec(
                    spec=spec,
                    index=index,
                    files=version.files,
                    kind=version.engine_kind,
                    options=version.options,
                    draft_dir=draft_dir,
                )
                read_back = UnitSpec.from_json(unit.to_json(), self.settings, spec.name)  # refused here, not later
                if read_back.spec.args != spec.args:
                    raise UnitSpecError(f"{spec.name}: the unit would start other arguments than the deploy")
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


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.chmod(staging, 0o640)  # the engines' group reads it; nobody else
    os.replace(staging, path)

"""Deploying a version: verify its files, start its engines (the code the supervisor and the node's units use),
wait for health, switch its served name over, then drain and stop the version it replaced. Rollback deploys
the version the name pointed at before.

The switch is one database row (``served_models``) that every gateway reads every
``registry.poll_interval_s``: a request already routed keeps its engine, and the old engines stop only once
each gateway has had time to switch and the old engines report no request in flight (their metrics)."""

from __future__ import annotations

import fcntl
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from appliance.db.engine import create_schema, make_engine
from appliance.engines.manifest import ModelManifest, ModelSource
from appliance.engines.runner import (
    EngineSpec,
    engine_env,
    engine_python,
    http_ok,
    pid_alive,
    start_engine,
    stop_group,
)
from appliance.lib.errors import ApplianceError, ConflictError
from appliance.registry import service
from appliance.registry.files import RegistryIntegrityError, verify_files
from appliance.registry.importer import check_draft
from appliance.registry.launch import Launcher, ProcessLauncher, UnitLauncher, gpu_node
from appliance.registry.models import APPROVED, DEPLOYED, ModelVersion, ServedModel
from appliance.registry.options import ServingOptions, parse_options, vllm_args
from appliance.settings import EngineKind, Settings

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
VLLM = EngineKind(command=["(vllm: appliance.engines.runner.engine_command)"])


def engine_kind(settings: Settings, name: str) -> EngineKind:
    if name == "vllm":
        return VLLM
    try:
        return settings.registry.engine_kinds[name]
    except KeyError:
        raise ConflictError(f"unknown engine kind {name!r} (registry.engine_kinds)") from None


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def allocate_ports(session: Session, settings: Settings, count: int) -> list[int]:
    """``count`` ports from ``registry.port_base`` up, taken neither by a deployment nor by anything else."""
    taken = {int(e["port"]) for row in session.exec(select(ServedModel)).all() for e in row.engines}
    ports: list[int] = []
    port = settings.registry.port_base
    last = min(65535, settings.registry.port_base + settings.registry.port_count - 1)
    while len(ports) < count:
        if port > last:
            raise ConflictError(
                f"no free port for the engines in {settings.registry.port_base}-{last} (registry.port_count)"
            )
        if port not in taken and _free(settings.engines.host, port):
            ports.append(port)
        port += 1
    return ports


def version_specs(
    settings: Settings, version: ModelVersion, ports: list[int], draft_dir: Path | None = None
) -> list[EngineSpec]:
    """The version's engines: one per replica, each with the version's serving options as vLLM arguments."""
    options = parse_options(version.options)
    manifest = ModelManifest(
        name=version.served_name,
        description=f"registry version {version.version}",
        runner="pooling" if version.runner == "pooling" else "generate",
        format="hf",
        context_length=options.context_length or version.context_length,
        source=ModelSource(package="registry", version=f"v{version.version}", path=version.source),
        weights={f["path"]: f["sha256"] for f in version.files},
    )
    engine_args = vllm_args(options, gpu=gpu_node(), draft_dir=draft_dir) if version.engine_kind == "vllm" else None
    specs = []
    for replica, port in enumerate(ports):
        name = f"{version.served_name}-v{version.version}" + (f"-{replica}" if replica else "")
        specs.append(
            EngineSpec(
                manifest=manifest,
                model_dir=Path(version.path),
                host=settings.engines.host,
                port=port,
                log_path=settings.data_dir / "logs" / f"engine-{name}.log",
                name=name,
                args=engine_args.args if engine_args else (),
                env=tuple(engine_args.env.items()) if engine_args else (),
            )
        )
    return specs


def launch(settings: Settings, spec: EngineSpec, kind_name: str, index: int) -> subprocess.Popen[bytes]:
    """Start one engine: vLLM exactly as the supervisor does; another kind from its command template."""
    if kind_name == "vllm":
        return start_engine(spec, engine_python(settings), settings, index)
    kind = engine_kind(settings, kind_name)
    python = settings.engines.venv / "bin" / "python" if settings.engines.venv else "python3"
    command = [
        part.format(
            python=python, model_dir=spec.model_dir, served_name=spec.manifest.name, host=spec.host, port=spec.port
        )
        for part in kind.command
    ]
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("ab") as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=engine_env(settings, spec, index),
            start_new_session=True,
        )


def launcher(settings: Settings) -> Launcher:
    """systemd units on a node; child processes of the deploying process in the development layout."""
    if settings.server.service_manager == "systemd":
        return UnitLauncher(settings)
    return ProcessLauncher(settings, launch)


def running_requests(url: str, running_metric: str, timeout: float = 2.0) -> float | None:
    """The engine's requests in flight from its Prometheus metrics (None: no answer)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (an engine URL we built)
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(running_metric) and line[len(running_metric) : len(running_metric) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return total


def drain(settings: Settings, engines: list[dict[str, Any]], kind: EngineKind) -> None:
    """Stop a replaced version's engines once every gateway has switched and their requests have finished."""
    time.sleep(2 * settings.registry.poll_interval_s + 0.5)  # every gateway has read the new mapping
    deadline = time.monotonic() + settings.registry.drain_timeout_s
    for engine in engines:
        if kind.metrics_path and kind.running_metric:
            while time.monotonic() < deadline:
                running = running_requests(engine["url"] + kind.metrics_path, kind.running_metric)
                if not running:  # zero, or the engine no longer answers
                    break
                time.sleep(0.2)
    launcher(settings).stop(engines)


@contextmanager
def _name_lock(settings: Settings, served_name: str, *, wait: bool = True) -> Iterator[bool]:
    """One deployment of a served name at a time, whichever process runs it. Yields whether it is held (always,
    when ``wait``)."""
    settings.registry_dir.mkdir(parents=True, exist_ok=True)
    with (settings.registry_dir / f".deploy-{served_name}.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def deploy(db: Engine, settings: Settings, version_id: int, actor: str, *, action: str = "deploy") -> dict[str, Any]:
    """Start ``version_id``'s engines, switch its served name to them, then drain and stop the old ones."""
    with Session(db) as session:
        served_name = service.get_version(session, version_id).served_name
    with _name_lock(settings, served_name):
        return _deploy(db, settings, version_id, actor, action)


def _deploy(db: Engine, settings: Settings, version_id: int, actor: str, action: str) -> dict[str, Any]:
    with Session(db) as session:
        version = service.get_version(session, version_id)
        what = f"{version.served_name} v{version.version}"
        if version.state != APPROVED:
            raise ConflictError(f"{what} is {version.state}: only an approved version is deployed")
        if version.files_removed:
            raise ConflictError(f"{what}: its files were removed")
        options: ServingOptions = parse_options(version.options)
        draft_dir = check_draft(session, options)
        kind = engine_kind(settings, version.engine_kind)
        verify_files(Path(version.path), version.files, what)  # before every start
        ports = allocate_ports(session, settings, options.replicas)
        specs = version_specs(settings, version, ports, draft_dir)
    try:
        engines = launcher(settings).start(specs, version, kind, draft_dir)
    except BaseException:
        with Session(db) as session:
            service.audit(settings, action, service.get_version(session, version_id), actor, "failure")
        raise
    result, old_engines, old_kind = switch(db, settings, version_id, engines, kind, actor, action)
    log.info("%s: %s v%s serves on %s", action, result["served_name"], result["version"], [e["url"] for e in engines])
    if old_engines:
        drain(settings, old_engines, old_kind)
    return result


def switch(
    db: Engine,
    settings: Settings,
    version_id: int,
    engines: list[dict[str, Any]],
    kind: EngineKind,
    actor: str,
    action: str,
) -> tuple[dict[str, Any], list[dict[str, Any]], EngineKind]:
    """Point the served name at ``engines`` in one transaction: the mapping, the new version's state and the
    old one's. Returns the version's view, the engines it replaced and their kind (to drain)."""
    with Session(db) as session:
        version = service.get_version(session, version_id)
        current = session.get(ServedModel, version.served_name)
        old_engines: list[dict[str, Any]] = []
        old_kind = kind
        if current is None:
            current = ServedModel(served_name=version.served_name, version_id=version_id, switched_by=actor)
        else:
            old = session.get(ModelVersion, current.version_id)
            old_engines = list(current.engines)
            if old is not None:
                old_kind = engine_kind(settings, old.engine_kind)
                if old.state == DEPLOYED:
                    service.record(session, old, "undeploy", APPROVED, actor, replaced_by=version_id)
            current.previous_version_id = current.version_id
            current.version_id = version_id
        current.engines = engines
        current.runner = version.runner
        current.switched_by = actor
        current.switched_at = datetime.now(UTC)
        session.add(current)
        service.record(session, version, action, DEPLOYED, actor, engines=[e["url"] for e in engines])
        session.commit()  # the switch: gateways route new requests to the new engines from their next read
        session.refresh(version)
        result = service.show(session, version_id)
        service.audit(settings, action, version, actor, engines=[e["url"] for e in engines])
    return result, old_engines, old_kind


def rollback(db: Engine, settings: Settings, served_name: str, actor: str) -> dict[str, Any]:
    """Point ``served_name`` back at the version it served before (its engines started again, then switched)."""
    with Session(db) as session:
        current = session.get(ServedModel, served_name)
        if current is None or current.previous_version_id is None:
            raise ConflictError(f"{served_name} has no earlier version to roll back to")
        previous = current.previous_version_id
    return deploy(db, settings, previous, actor, action="rollback")


def stop_all(db: Engine) -> list[int]:
    """Stop every engine the registry started (``appliance down``); the mapping stays for the next start."""
    stopped = []
    with Session(db) as session:
        for row in session.exec(select(ServedModel)).all():
            for engine in row.engines:
                if engine.get("pid"):
                    stop_group(int(engine["pid"]), timeout_s=30)
                    stopped.append(int(engine["pid"]))
    return stopped


@dataclass
class _Restarts:
    count: int = 0
    next_at: float = 0.0


def restart_crashed(db: Engine, settings: Settings, restarts: dict[str, _Restarts]) -> list[str]:
    """Start again, without waiting for health, each deployed engine whose process has exited (the development
    supervisor calls this every second; on a node systemd does it). Backs off 2^n seconds, at most
    ``MAX_RESTARTS`` times per engine, never with files changed since import. A served name being deployed is
    left to its deployment (its lock is held). Returns the engines started."""
    started: list[str] = []
    with Session(db) as session:
        names = [row.served_name for row in session.exec(select(ServedModel)).all()]
    for served_name in names:
        with _name_lock(settings, served_name, wait=False) as held:
            if held:
                started += _restart_row(db, settings, served_name, restarts)
    return started


def _restart_row(db: Engine, settings: Settings, served_name: str, restarts: dict[str, _Restarts]) -> list[str]:
    now = time.monotonic()
    started: list[str] = []
    with Session(db) as session:
        row = session.get(ServedModel, served_name)
        if row is None:
            return []
        dead = [(i, e) for i, e in enumerate(row.engines) if e.get("pid") and not pid_alive(int(e["pid"]))]
        if not dead:
            return []
        version = service.get_version(session, row.version_id)
        what = f"{version.served_name} v{version.version}"
        engines = [dict(engine) for engine in row.engines]
        ports = [int(e["port"]) for e in row.engines]
        specs = {
            s.name: s
            for s in version_specs(settings, version, ports, check_draft(session, parse_options(version.options)))
        }
        for index, engine in dead:
            state = restarts.setdefault(engine["name"], _Restarts())
            if state.next_at == 0.0:
                log.error("registry engine %s (pid %s) exited", engine["name"], engine["pid"])
                state.next_at = now + min(60.0, 2.0**state.count)
                continue
            if now < state.next_at or state.count >= MAX_RESTARTS or engine["name"] not in specs:
                continue
            state.count += 1
            state.next_at = 0.0
            try:
                verify_files(Path(version.path), version.files, what)
                process = launch(settings, specs[engine["name"]], version.engine_kind, index)
            except (RegistryIntegrityError, OSError, ApplianceError) as exc:
                log.error("registry engine %s is not started again: %s", engine["name"], exc)
                state.count = MAX_RESTARTS
                continue
            engines[index]["pid"] = process.pid
            started.append(engine["name"])
            row.engines = engines
            session.add(row)
            session.commit()  # each engine as it starts: an error with the next one does not orphan this one
            log.warning("registry engine %s restarted (restart %d)", engine["name"], state.count)
    return started


def start_deployed(db: Engine, settings: Settings, cancelled: Callable[[], bool] | None = None) -> int:
    """Start the engines of every deployed version that is not answering (``appliance up`` after a stop or a
    reboot), on the ports the mapping records, files verified first. Returns how many engines were started."""
    started = 0
    with Session(db) as session:
        rows = list(session.exec(select(ServedModel)).all())
    for row in rows:
        with Session(db) as session:
            version = service.get_version(session, row.version_id)
            kind = engine_kind(settings, version.engine_kind)
            if row.engines and all(
                pid_alive(e.get("pid")) and http_ok(e["url"] + kind.health_path) for e in row.engines
            ):
                continue
            what = f"{version.served_name} v{version.version}"
            verify_files(Path(version.path), version.files, what)
            draft_dir = check_draft(session, parse_options(version.options))
            specs = version_specs(settings, version, [int(e["port"]) for e in row.engines], draft_dir)
        engines = ProcessLauncher(settings, launch).start(specs, version, kind, draft_dir, cancelled)
        with Session(db) as session:
            current = session.get(ServedModel, row.served_name)
            if current is not None and current.version_id == version.id:
                current.engines = engines
                session.add(current)
                session.commit()
        log.info("registry: %s started again on %s", what, [spec.url for spec in specs])
        started += len(specs)
    return started


class DeployedEngines:
    """The registry's deployed versions as the development supervisor runs them (``appliance up``/``down``)."""

    name = "the registry's deployed models"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._db: Engine | None = None
        self._restarts: dict[str, _Restarts] = {}

    def start(self, cancelled: Callable[[], bool]) -> None:
        self._on_database(lambda db: start_deployed(db, self._settings, cancelled=cancelled))

    def stop(self) -> None:
        self._on_database(stop_all)
        if self._db is not None:
            self._db.dispose()
            self._db = None

    def watch(self) -> None:
        if self._db is None:
            self._db = make_engine(self._settings.database_url)
        restart_crashed(self._db, self._settings, self._restarts)

    def _on_database(self, work: Callable[[Engine], object]) -> None:
        db = make_engine(self._settings.database_url)
        try:
            create_schema(db)
            work(db)
        finally:
            db.dispose()

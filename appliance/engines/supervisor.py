"""The supervisor behind ``appliance up``: prepares models, starts the engines and the gateway, watches
them, restarts a crashed engine, and stops everything it started (no orphans) on SIGTERM/SIGINT."""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol

from appliance.audit.setup import audit_store_for_once
from appliance.audit.store import AuditEvent
from appliance.engines.models import ensure_prepared
from appliance.engines.runner import (
    EngineSpec,
    configured_specs,
    engine_python,
    start_engine,
    stop_group,
    wait_healthy,
)
from appliance.engines.state import ApplianceState, EngineState, GatewayState, write_state
from appliance.identity import setup as identity_setup
from appliance.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 1.0
MAX_RESTARTS = 5


class ManagedEngines(Protocol):
    """Engines another domain deploys (the model registry's versions): started after the appliance's own,
    before the gateway, and stopped with them."""

    name: str

    def start(self, cancelled: Callable[[], bool]) -> None: ...

    def stop(self) -> None: ...

    def watch(self) -> None:
        """Called every second while the appliance runs: start again what crashed."""


@dataclass
class _Engine:
    spec: EngineSpec
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_restart_at: float = 0.0


@dataclass
class Supervisor:
    settings: Settings
    managed: Sequence[ManagedEngines] = ()  # engines other domains deploy (the model registry's)
    engines: list[_Engine] = field(default_factory=list)
    gateway: subprocess.Popen[bytes] | None = None
    _stop_requested: bool = False

    def run(self) -> int:
        """Run until asked to stop. Returns the process exit status."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        state = self._state("starting", "preparing models")
        write_state(self.settings.run_dir, state)
        try:
            self._start_all()
            if self._stop_requested:
                return 0
            self._publish("running", "")
            self._audit("appliance.up")
            self._print_ready()
            self._watch()
            return 0
        except Exception as exc:
            log.error("appliance failed: %s", exc)
            self._publish("failed", str(exc))
            return 1
        finally:
            self._stop_all()

    # -- start -------------------------------------------------------------------------------------

    def _start_all(self) -> None:
        settings = self.settings
        python = engine_python(settings)
        specs = configured_specs(settings)
        self.engines = [_Engine(spec, index) for index, spec in enumerate(specs)]
        for engine in self.engines:
            ensure_prepared(engine.spec.manifest, settings, python)
        if identity_setup.bootstrap(settings):
            log.warning(
                "created the bootstrap admin `admin`; its one-time password is in %s",
                identity_setup.bootstrap_password_file(settings),
            )
        self._publish("starting", "starting engines")
        for engine in self.engines:
            engine.process = start_engine(engine.spec, python, settings, engine.index)
            log.info(
                "engine %s starting on %s (pid %s)",
                engine.spec.manifest.name,
                engine.spec.url,
                engine.process.pid,
            )
        self._publish("starting", "waiting for engines to become healthy")
        deadline = time.monotonic() + settings.engines.startup_timeout_s
        for engine in self.engines:
            if self._stop_requested:
                return
            wait_healthy(
                engine.spec.url + "/health",
                max(1.0, deadline - time.monotonic()),
                engine.process,
                what=f"engine {engine.spec.manifest.name} (log: {engine.spec.log_path})",
                cancelled=self._stopping,
            )
        if self._stop_requested:
            return
        for managed in self.managed:
            self._publish("starting", f"starting {managed.name}")
            managed.start(cancelled=self._stopping)
        if self._stop_requested:
            return
        self.gateway = self._start_gateway()
        self._publish("starting", "waiting for the gateway")
        wait_healthy(
            self.settings.gateway_url + "/healthz", 60.0, self.gateway, what="gateway", cancelled=self._stopping
        )

    def _start_gateway(self) -> subprocess.Popen[bytes]:
        settings = self.settings
        log_path = settings.data_dir / "logs" / "gateway.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["APPLIANCE_DATA_DIR"] = str(settings.data_dir)
        env["APPLIANCE_GATEWAY__ROUTES"] = json.dumps([e.spec.route.model_dump() for e in self.engines])
        command = [sys.executable, "-m", "appliance.cli", "serve"]  # as a node's appliance.service does
        with log_path.open("ab") as handle:
            return subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    # -- watch -------------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Restart what crashed, never what is being stopped: asked to stop, it returns before restarting
        anything (`appliance down` stops the engines and the gateway only once the supervisor has ended)."""
        while not self._stop_requested:
            time.sleep(POLL_S)
            now = time.monotonic()
            for engine in self.engines:
                if self._stop_requested:
                    return
                process = engine.process
                if process is None or process.poll() is None:
                    continue
                if engine.next_restart_at == 0.0:
                    log.error(
                        "engine %s exited with status %s (log: %s)",
                        engine.spec.manifest.name,
                        process.returncode,
                        engine.spec.log_path,
                    )
                    stop_group(process.pid, timeout_s=5)
                    engine.next_restart_at = now + min(60.0, 2.0**engine.restarts)
                    self._publish("running", f"engine {engine.spec.manifest.name} crashed")
                elif now >= engine.next_restart_at and engine.restarts < MAX_RESTARTS:
                    engine.restarts += 1
                    engine.next_restart_at = 0.0
                    engine.process = start_engine(
                        engine.spec, engine_python(self.settings), self.settings, engine.index
                    )
                    log.warning("engine %s restarted (restart %d)", engine.spec.manifest.name, engine.restarts)
                    self._publish("running", f"engine {engine.spec.manifest.name} restarting")
            for managed in self.managed:
                if self._stop_requested:
                    return
                try:
                    managed.watch()
                except Exception:  # one domain's failure must not stop the supervisor watching the others
                    log.exception("watching %s failed", managed.name)
            if self._stop_requested:
                return
            if self.gateway is not None and self.gateway.poll() is not None:
                log.error("gateway exited with status %s; restarting it", self.gateway.returncode)
                self.gateway = self._start_gateway()
                self._publish("running", "gateway restarted")

    # -- stop --------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self._stop_requested = True

    def _stopping(self) -> bool:
        return self._stop_requested

    def _audit(self, event_type: str) -> None:
        """Lifecycle actions go into the audit trail too (who started or stopped the appliance)."""
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        detail = {"engines": [e.spec.manifest.name for e in self.engines], "gateway": self.settings.gateway_url}
        event = AuditEvent(
            event_type, "success", component="supervisor", subject=user, subject_kind="os_user", detail=detail
        )
        with audit_store_for_once(self.settings) as store:
            store.append([event])

    def _stop_all(self) -> None:
        if self.gateway is not None:
            try:
                self._audit("appliance.down")
            except Exception:  # the trail must not keep the appliance from stopping; the failure is logged
                log.exception("recording appliance.down in the audit trail failed")
        self._publish("stopping", "")
        if self.gateway is not None:
            stop_group(self.gateway.pid)
        for engine in self.engines:
            if engine.process is not None:
                stop_group(engine.process.pid)
        for managed in self.managed:
            try:
                managed.stop()
            except Exception:
                log.exception("stopping %s failed", managed.name)
        state_file = self.settings.run_dir / "state.json"
        state_file.unlink(missing_ok=True)

    # -- state -------------------------------------------------------------------------------------

    def _state(self, phase: str, message: str) -> ApplianceState:
        settings = self.settings
        return ApplianceState(
            supervisor_pid=os.getpid(),
            data_dir=str(settings.data_dir),
            phase=phase,
            message=message,
            engines=[
                EngineState(
                    model=e.spec.manifest.name,
                    url=e.spec.url,
                    runner=e.spec.manifest.runner,
                    pid=e.process.pid if e.process is not None and e.process.poll() is None else None,
                    log=str(e.spec.log_path),
                    restarts=e.restarts,
                )
                for e in self.engines
            ],
            gateway=GatewayState(
                url=settings.gateway_url,
                pid=self.gateway.pid if self.gateway is not None else None,
                log=str(settings.data_dir / "logs" / "gateway.log"),
            ),
        )

    def _publish(self, phase: str, message: str) -> None:
        write_state(self.settings.run_dir, self._state(phase, message))

    def _print_ready(self) -> None:
        lines = [f"appliance is up: gateway {self.settings.gateway_url}  (data: {self.settings.data_dir})"]
        for engine in self.engines:
            spec, pid = engine.spec, engine.process.pid if engine.process else "-"
            lines.append(f"  engine {spec.manifest.name:<24} {spec.url}  pid {pid}  log {spec.log_path}")
        lines.append("stop with Ctrl-C (or `appliance down`)")
        print("\n".join(lines), flush=True)

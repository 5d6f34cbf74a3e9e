"""The running appliance's state file (``<data_dir>/run/state.json``) and the status report built from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from appliance.engines.runner import http_ok, pid_alive


class EngineState(BaseModel):
    model: str
    url: str
    runner: str
    pid: int | None = None
    log: str
    restarts: int = 0


class GatewayState(BaseModel):
    url: str
    pid: int | None = None
    log: str


class ApplianceState(BaseModel):
    supervisor_pid: int
    data_dir: str
    phase: str = Field(description="starting | running | stopping | failed")
    message: str = ""
    engines: list[EngineState] = Field(default_factory=list)
    gateway: GatewayState | None = None


def state_path(run_dir: Path) -> Path:
    return run_dir / "state.json"


def write_state(run_dir: Path, state: ApplianceState) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = state_path(run_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2), encoding="utf-8")
    os.replace(tmp, path)


def read_state(run_dir: Path) -> ApplianceState | None:
    path = state_path(run_dir)
    try:
        return ApplianceState.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def status_report(
    state: ApplianceState | None, *, data_dir: Path, gateway_url: str, bootstrap_password_file: Path | None = None
) -> dict[str, Any]:
    """What ``appliance status --json`` prints: liveness is probed now, not taken from the file."""
    running = state is not None and pid_alive(state.supervisor_pid)
    engines = []
    if state is not None:
        for engine in state.engines:
            alive = running and pid_alive(engine.pid)
            engines.append(
                {
                    "model": engine.model,
                    "url": engine.url,
                    "pid": engine.pid if alive else None,
                    "healthy": alive and http_ok(engine.url + "/health"),
                    "restarts": engine.restarts,
                    "log": engine.log,
                }
            )
    gateway = state.gateway if state is not None else None
    gateway_alive = running and gateway is not None and pid_alive(gateway.pid)
    gateway_healthy = gateway_alive and gateway is not None and http_ok(gateway.url + "/healthz")
    report: dict[str, Any] = {
        "running": running,
        "phase": state.phase if state is not None and running else "stopped",
        "message": state.message if state is not None else "",
        "gateway_url": gateway.url if gateway is not None else gateway_url,
        "gateway": {
            "pid": gateway.pid if gateway_alive and gateway is not None else None,
            "healthy": gateway_healthy,
            "log": gateway.log if gateway is not None else None,
        },
        "data_dir": str(data_dir),
        "supervisor_pid": state.supervisor_pid if running and state is not None else None,
        "engines": engines,
    }
    if bootstrap_password_file is not None and bootstrap_password_file.exists():
        report["bootstrap_password_file"] = str(bootstrap_password_file)
    report["healthy"] = bool(running and gateway_healthy and engines and all(e["healthy"] for e in engines))
    return report


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2)

"""Status of an installed node, where systemd runs the appliance (``server.service_manager = "systemd"``).

The units are the ones the playbooks install: ``appliance.service``, one ``vllm-<engine>.service`` per engine
of ``[engines]`` (:func:`appliance.engines.runner.engine_specs` names them), and the local PostgreSQL and
Qdrant servers when the settings point at them. Each unit's state comes from ``systemctl show``; the gateway's
readiness is probed over its own URL (HTTPS, trusting ``server.tls_cafile``).
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from appliance.engines.runner import configured_specs, http_ok
from appliance.lib.errors import ApplianceError
from appliance.settings import Settings

PROPERTIES = ("Id", "ActiveState", "SubState", "MainPID", "NRestarts", "ActiveEnterTimestamp", "LoadState")


class SystemdError(ApplianceError):
    code = "systemd_unavailable"


def node_units(settings: Settings, deployed: Sequence[tuple[str, str | None]] = ()) -> list[tuple[str, str | None]]:
    """(unit, health URL or None) for every service of this node, in start order; ``deployed``: the engine units
    of the model registry's deployments."""
    units: list[tuple[str, str | None]] = []
    if settings.database_url.startswith("postgresql") and "/var/run/postgresql" in settings.database_url:
        units.append(("postgresql.service", None))
    qdrant = settings.retrieval.qdrant_url
    if qdrant and urlsplit(qdrant).hostname in ("127.0.0.1", "localhost", "::1"):
        units.append(("qdrant.service", None))
    for spec in configured_specs(settings):
        units.append((f"vllm-{spec.name}.service", spec.url + "/health"))
    units.extend(deployed)
    units.append(("appliance.service", None))
    return units


def unit_states(units: list[str]) -> dict[str, dict[str, str]]:
    """``systemctl show`` of each unit: property -> value."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise SystemdError("systemctl is not on this machine; is server.service_manager right?")
    result = subprocess.run(
        [systemctl, "show", "--no-pager", f"--property={','.join(PROPERTIES)}", *units],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if result.returncode != 0:
        raise SystemdError(f"systemctl show failed: {result.stderr.strip() or result.returncode}")
    states: dict[str, dict[str, str]] = {}
    for block in result.stdout.strip().split("\n\n"):
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in values:
            states[values["Id"]] = values
    return states


def gateway_ready(settings: Settings, timeout: float = 5.0) -> tuple[bool, str]:
    """(ready, why not) from the gateway's ``/readyz``, over HTTPS when the gateway serves it."""
    context = None
    if settings.server.scheme == "https":
        context = ssl.create_default_context(
            cafile=str(settings.server.tls_cafile) if settings.server.tls_cafile else None
        )
    url = settings.gateway_url + "/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310 (our URL)
            return response.status == 200, ""
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        down = [e.get("model", "?") for e in body.get("engines", []) if not e.get("healthy")]
        return False, f"HTTP {exc.code}" + (f": engines down: {', '.join(down)}" if down else "")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def node_report(settings: Settings, deployed: Sequence[tuple[str, str | None]] = ()) -> dict[str, Any]:
    """What ``appliance status --json`` prints on a node (the keys of the development report where they apply)."""
    units = node_units(settings, deployed)
    states = unit_states([unit for unit, _ in units])
    rows = []
    for unit, health_url in units:
        state = states.get(unit, {})
        active = state.get("ActiveState", "unknown")
        row: dict[str, Any] = {
            "unit": unit,
            "loaded": state.get("LoadState", "unknown"),
            "active": active,
            "sub": state.get("SubState", "unknown"),
            "pid": int(state.get("MainPID") or 0) or None,
            "restarts": int(state.get("NRestarts") or 0),
            "since": state.get("ActiveEnterTimestamp") or None,
        }
        row["healthy"] = active == "active" and (health_url is None or http_ok(health_url))
        rows.append(row)
    ready, why = (
        gateway_ready(settings)
        if states.get("appliance.service", {}).get("ActiveState") == "active"
        else (
            False,
            "appliance.service is not active",
        )
    )
    engines = [row for row in rows if row["unit"].startswith("vllm-")]
    return {
        "manager": "systemd",
        "running": any(row["active"] == "active" for row in rows),
        "healthy": ready and all(row["healthy"] for row in rows),
        "gateway_url": settings.gateway_url,
        "gateway": {"ready": ready, "error": why or None},
        "units": rows,
        "engines": engines,
        "data_dir": str(settings.data_dir),
    }

"""The ``appliance`` command: ``up`` (foreground, or ``--detach``), ``status [--json]``, ``down``, ``serve``, and
each domain's own commands (admin, identity, audit, media, install, node, engines)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance.audit import cli as audit_cli
from appliance.backup import cli as backup_cli
from appliance.engines import cli as engines_cli
from appliance.engines.runner import pid_alive, stop_group, stop_process
from appliance.engines.state import dumps, read_state, status_report
from appliance.identity import cli as identity_cli
from appliance.identity.setup import bootstrap_password_file
from appliance.lib.errors import ApplianceError
from appliance.lib.logging import configure_logging
from appliance.lib.malloc import cap_arenas
from appliance.media import cli as media_cli
from appliance.registry import cli as registry_cli
from appliance.settings import NODE_CONFIG, Settings, config_file, get_settings, is_checkout

EXIT_OK, EXIT_FAILED, EXIT_UNHEALTHY, EXIT_NOT_RUNNING = 0, 1, 1, 3


def cmd_up(settings: Settings, detach: bool, timeout_s: float) -> int:
    existing = read_state(settings.run_dir)
    if existing is not None and pid_alive(existing.supervisor_pid):
        print(
            f"the appliance is already running (supervisor pid {existing.supervisor_pid}); see `appliance status`",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if detach:
        return _up_detached(settings, timeout_s)
    from appliance.engines.supervisor import Supervisor
    from appliance.registry.deploy import DeployedEngines

    return Supervisor(settings, managed=[DeployedEngines(settings)]).run()


def _up_detached(settings: Settings, timeout_s: float) -> int:
    log_path = settings.data_dir / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, APPLIANCE_DATA_DIR=str(settings.data_dir))
    with log_path.open("ab") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "up"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    print(f"starting the appliance in the background (pid {process.pid}, log {log_path}) ...", flush=True)
    deadline = time.monotonic() + timeout_s
    last_message = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(
                f"the appliance failed to start (exit {process.returncode}); last lines of {log_path}:", file=sys.stderr
            )
            print(_tail(log_path), file=sys.stderr)
            return EXIT_FAILED
        state = read_state(settings.run_dir)
        if state is not None and state.supervisor_pid == process.pid:
            if state.message and state.message != last_message:
                print(f"  {state.message}", flush=True)
                last_message = state.message
            if state.phase == "running":
                report = status_report(state, data_dir=settings.data_dir, gateway_url=settings.gateway_url)
                if report["healthy"]:
                    _print_status(report)
                    return EXIT_OK
        time.sleep(1.0)
    print(f"the appliance was not healthy after {timeout_s:.0f}s; stopping it", file=sys.stderr)
    stop_group(process.pid)
    return EXIT_FAILED


def cmd_serve(settings: Settings) -> int:
    """The gateway in this process (a node's appliance.service; ``appliance up`` starts it the same way)."""
    cap_arenas()  # first: before any thread of this process, and inherited by the workers uvicorn starts

    import uvicorn

    from appliance.db.engine import create_schema, make_engine

    server = settings.server
    engine = make_engine(settings.database_url)
    create_schema(engine)  # once, before the workers start (each then finds the schema at its head)
    engine.dispose()
    uvicorn.run(
        "appliance.asgi:create_served_app",
        factory=True,
        host=server.host,
        port=server.port,
        ssl_certfile=str(server.tls_certfile) if server.tls_certfile else None,
        ssl_keyfile=str(server.tls_keyfile) if server.tls_keyfile else None,
        log_level=server.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
        workers=server.workers,
    )
    return EXIT_OK


def cmd_status(settings: Settings, as_json: bool, wait_s: float = 0.0) -> int:
    """What runs and whether it is healthy: from systemd on a node, from ``appliance up``'s state file otherwise.
    With ``wait_s``, probe until healthy or that many seconds passed, then report once."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            report = _status_report(settings)
        except ApplianceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return EXIT_FAILED
        if report["healthy"] or time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    if bootstrap_password_file(settings).exists():
        report["bootstrap_password_file"] = str(bootstrap_password_file(settings))
    if as_json:
        print(dumps(report))
    elif report.get("manager") == "systemd":
        _print_node_status(report)
    else:
        _print_status(report)
    if not report["running"]:
        return EXIT_NOT_RUNNING
    return EXIT_OK if report["healthy"] else EXIT_UNHEALTHY


def _status_report(settings: Settings) -> dict[str, Any]:
    if settings.server.service_manager == "systemd":
        from appliance.engines.systemd import node_report
        from appliance.registry.units import deployed_units

        return node_report(settings, deployed_units(settings))
    return status_report(read_state(settings.run_dir), data_dir=settings.data_dir, gateway_url=settings.gateway_url)


def _print_node_status(report: dict[str, Any]) -> None:
    state = "healthy" if report["healthy"] else ("running, NOT healthy" if report["running"] else "stopped")
    print(f"appliance: {state} (systemd)")
    gateway = report["gateway"]
    ready = "ready" if gateway["ready"] else f"NOT ready: {gateway['error']}"
    print(f"  gateway  {report['gateway_url']}  {ready}")
    if report.get("bootstrap_password_file"):
        print(f"  sign-in  user `admin`, one-time password in {report['bootstrap_password_file']}")
    for row in report["units"]:
        print(f"  {row['unit']:<40} {row['active']}/{row['sub']}  pid {row['pid'] or '-'}  restarts {row['restarts']}")


def cmd_placement(settings: Settings, as_json: bool) -> int:
    from appliance.db.engine import create_schema, make_engine
    from appliance.placement.service import build_report, render

    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
        report = build_report(engine, settings)
    finally:
        engine.dispose()
    print(dumps(report) if as_json else render(report))
    return EXIT_OK


def cmd_drift(settings: Settings, window: str, baseline_days: int, as_json: bool) -> int:
    from appliance.db.engine import create_schema, make_engine
    from appliance.drift.report import drift_report

    engine = make_engine(settings.database_url)
    try:
        create_schema(engine)
        report = drift_report(engine, window=window, baseline_days=baseline_days)
    finally:
        engine.dispose()
    if as_json:
        print(dumps(report))
    else:
        print(f"drift, last {window} against the {baseline_days} days before: {len(report['findings'])} finding(s)")
        for finding in report["findings"]:
            print(f"  {finding['summary']}")
    return EXIT_OK


def cmd_down(settings: Settings, timeout_s: float) -> int:
    state = read_state(settings.run_dir)
    if state is None:
        print("the appliance is not running")
        return EXIT_OK
    if pid_alive(state.supervisor_pid):
        # The supervisor first: it stops the gateway and the engines itself, and must not restart them. It is
        # signalled as a process, not as a group: in the foreground (`make run`) it leads no group of its own.
        try:
            stop_process(state.supervisor_pid, timeout_s=timeout_s)
        except PermissionError:
            print(f"error: not allowed to stop the supervisor (pid {state.supervisor_pid})", file=sys.stderr)
            return EXIT_FAILED
    for pid in [e.pid for e in state.engines] + [state.gateway.pid if state.gateway else None]:
        if pid and pid_alive(pid):
            stop_group(pid, timeout_s=10)
    (settings.run_dir / "state.json").unlink(missing_ok=True)
    print("the appliance is stopped")
    return EXIT_OK


def _print_status(report: dict[str, object]) -> None:
    gateway = report["gateway"]
    assert isinstance(gateway, dict)
    state = "healthy" if report["healthy"] else ("running, NOT healthy" if report["running"] else "stopped")
    print(f"appliance: {state}" + (f" ({report['message']})" if report.get("message") else ""))
    print(
        f"  gateway  {report['gateway_url']}  pid {gateway.get('pid') or '-'}  "
        f"{'healthy' if gateway.get('healthy') else 'down'}"
    )
    print(f"  data     {report['data_dir']}")
    if report.get("bootstrap_password_file"):
        print(f"  sign-in  user `admin`, one-time password in {report['bootstrap_password_file']}")
    engines = report["engines"]
    assert isinstance(engines, list)
    for engine in engines:
        print(
            f"  engine   {engine['model']:<24} {engine['url']}  pid {engine['pid'] or '-'}  "
            f"{'healthy' if engine['healthy'] else 'DOWN'}  restarts {engine['restarts']}"
        )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmd_retrieval_migrate(settings: Settings, remove_local: bool) -> int:
    from appliance.retrieval.migrate import migrate
    from appliance.retrieval.setup import qdrant_local_path

    folder = qdrant_local_path(settings)
    if folder is None:
        print(
            "error: the vectors are in a Qdrant server (retrieval.backend = server); nothing to migrate",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        report = migrate(folder, remove_local=remove_local)
    except Exception as exc:  # the lock (appliance running), a count mismatch: said, not a traceback
        print(f"error: the migration failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for name, done in report.items():
        seconds = done["build"].get("seconds", 0.0)
        print(f"{name}: {done['points']} points; index {seconds:.1f} s; local copy removed: {done['local_removed']}")
    print(f"{len(report)} collections in Qdrant Edge at {folder / 'edge'}")
    if settings.retrieval.backend != "edge":
        print("note: retrieval.backend is not `edge`: set it to serve the migrated collections")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Sovereign AI inference appliance")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="prepare models, start the engines and the gateway")
    up.add_argument("--detach", action="store_true", help="return once everything is healthy")
    up.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for health with --detach")
    status = sub.add_parser("status", help="what runs and whether it is healthy")
    status.add_argument("--json", action="store_true", help="one JSON object (stable keys)")
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for health")
    sub.add_parser("serve", help="run the gateway in this process (what a node's appliance.service runs)")
    down = sub.add_parser("down", help="stop everything `up` started")
    down.add_argument("--timeout", type=float, default=60.0)
    identity_cli.add_parsers(sub)
    identity_cli.add_identity_parsers(sub)
    audit_cli.add_parsers(sub)
    media_cli.add_parsers(sub)
    media_cli.add_install_parser(sub)
    media_cli.add_node_parsers(sub)
    engines_cli.add_parsers(sub)
    registry_cli.add_parsers(sub)
    placement = sub.add_parser("placement", help="where this workload is cheapest to run, from the node's history")
    placement_sub = placement.add_subparsers(dest="placement_command", required=True)
    placement_report = placement_sub.add_parser("report", help="the verdict, its variables and its triggers")
    placement_report.add_argument("--json", action="store_true")
    drift = sub.add_parser("drift", help="behavioural drift per workflow, agent and model")
    drift_sub = drift.add_subparsers(dest="drift_command", required=True)
    drift_report = drift_sub.add_parser("report", help="the recent window against its baseline: findings")
    drift_report.add_argument("--window", choices=("hour", "day"), default="day")
    drift_report.add_argument("--baseline-days", type=int, default=7)
    drift_report.add_argument("--json", action="store_true")
    backup_cli.add_parsers(sub)
    retrieval = sub.add_parser("retrieval", help="the vector store")
    retrieval_sub = retrieval.add_subparsers(dest="retrieval_command", required=True)
    migrate = retrieval_sub.add_parser("migrate", help="copy local-mode collections into Qdrant Edge (stopped)")
    migrate.add_argument("--remove-local", action="store_true", help="delete the local-mode copy once checked")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    local = args.command not in ("media", "install")  # those two run on the installer, not on a node
    if local and config_file() is None and not is_checkout() and "APPLIANCE_DATA_DIR" not in os.environ:
        # An installed package with no configuration would open a new database inside site-packages.
        print(
            f"error: no configuration: neither APPLIANCE_CONFIG, ./appliance.toml nor {NODE_CONFIG} exists",
            file=sys.stderr,
        )
        return EXIT_FAILED
    settings = get_settings()
    configure_logging(settings.server.log_level, settings.server.log_format)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # no migration lines on every command
    if args.command == "up":
        return cmd_up(settings, args.detach, args.timeout)
    if args.command == "status":
        return cmd_status(settings, args.json, args.wait)
    if args.command == "serve":
        return cmd_serve(settings)
    if args.command == "engines":
        return engines_cli.run(settings, args)
    if args.command == "models":
        return registry_cli.run(settings, args)
    if args.command == "node":
        return media_cli.run_node(settings, args)
    if args.command == "placement":
        return cmd_placement(settings, args.json)
    if args.command == "drift":
        return cmd_drift(settings, args.window, args.baseline_days, args.json)
    if args.command == "admin":
        return identity_cli.run(settings, args)
    if args.command == "identity":
        return identity_cli.run_identity(settings, args)
    if args.command == "audit":
        return audit_cli.run(settings, args)
    if args.command == "media":
        return media_cli.run(settings, args)
    if args.command == "install":
        return media_cli.run_install(args)
    if args.command in ("backup", "restore"):
        return backup_cli.run(settings, args)
    if args.command == "retrieval":
        return cmd_retrieval_migrate(settings, args.remove_local)
    return cmd_down(settings, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

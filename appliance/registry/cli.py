"""``appliance models import|list|show|approve|deploy|rollback|retire|remove``: the registry from the shell.

The actor of each transition is the operating-system user who runs the command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from sqlmodel import Session

from appliance.db.engine import create_schema, make_engine
from appliance.lib.errors import ApplianceError
from appliance.registry import deploy, service, units
from appliance.registry.importer import import_model
from appliance.registry.options import parse_options
from appliance.settings import Settings


def os_user() -> str:
    try:
        return f"os:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"os:{os.getuid()}"


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="the model registry: versions, approval, deployment, rollback")
    msub = models.add_subparsers(dest="models_command", required=True)
    imp = msub.add_parser("import", help="import a model folder (HF layout) or a GGUF file as a new version")
    imp.add_argument("source", type=Path)
    imp.add_argument("--name", required=True, help="served name (what clients send as `model`)")
    imp.add_argument("--options", default="{}", help="serving options as JSON (see the README)")
    imp.add_argument("--runner", choices=["generate", "pooling"], default=None)
    imp.add_argument("--engine-kind", default="vllm")
    lst = msub.add_parser("list", help="every version and its state")
    lst.add_argument("--name", default=None)
    for command, text in (
        ("show", "one version: files, checksums, options, history"),
        ("approve", "approve an imported version"),
        ("deploy", "start a version's engines and switch its served name to them"),
        ("retire", "retire a version (not the deployed one)"),
        ("remove", "delete a retired version's files"),
    ):
        parser = msub.add_parser(command, help=text)
        parser.add_argument("version", help="version id, or served-name:vN")
    rollback = msub.add_parser("rollback", help="point a served name back at the version it served before")
    rollback.add_argument("name")
    units_parser = msub.add_parser("units", help="a node's registry engine units (systemd runs these, not people)")
    usub = units_parser.add_subparsers(dest="units_command", required=True)
    reconcile = usub.add_parser("reconcile", help="start and stop vllm-registry@ units to match the specs (root)")
    reconcile.add_argument("--state", type=Path, default=Path("/var/lib/appliance-registry-units/applied.json"))
    exec_ = usub.add_parser("exec", help="verify a deployed engine's files and become it (the unit's ExecStart)")
    exec_.add_argument("name")


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.models_command == "units":  # no database: these run as root and as the engines' user
        try:
            if args.units_command == "exec":
                units.exec_engine(settings, args.name)
            else:
                _print(dataclasses.asdict(units.reconcile(settings, args.state)))
            return 0
        except ApplianceError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            # A refused spec or changed files stay refused: the unit is not restarted (RestartPreventExitStatus).
            return units.EXIT_REFUSED if args.units_command == "exec" else 1
    db = make_engine(settings.database_url)
    try:
        create_schema(db)
        return _run(db, settings, args)
    except ApplianceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        db.dispose()


def _run(db: Any, settings: Settings, args: argparse.Namespace) -> int:
    actor = os_user()
    command = args.models_command
    with Session(db) as session:
        if command == "import":
            try:
                options = parse_options(json.loads(args.options))
            except ValueError as exc:
                print(f"error: --options is not JSON: {exc}", file=sys.stderr)
                return 2
            version = import_model(
                session,
                settings,
                args.source,
                args.name,
                actor,
                options,
                runner=args.runner,
                engine_kind=args.engine_kind,
            )
            _print(service.show(session, version.id or 0))
            return 0
        if command == "list":
            _print(service.list_versions(session, args.name))
            return 0
        if command == "rollback":
            session.close()
            _print(deploy.rollback(db, settings, args.name, actor))
            return 0
        version_id = service.find_version(session, args.version).id or 0
        if command == "show":
            _print(service.show(session, version_id))
        elif command == "approve":
            service.approve(session, settings, version_id, actor)
            _print(service.show(session, version_id))
        elif command == "retire":
            service.retire(session, settings, version_id, actor)
            _print(service.show(session, version_id))
        elif command == "remove":
            service.remove_files(session, settings, version_id, actor)
            _print(service.show(session, version_id))
        elif command == "deploy":
            session.close()
            _print(deploy.deploy(db, settings, version_id, actor))
    return 0

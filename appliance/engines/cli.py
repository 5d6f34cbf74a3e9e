"""``appliance engines list|exec``: the engines of ``[engines]``, and the one way an engine process is started on
a node (the systemd unit's ``ExecStart``), from the same code the development runner starts them with."""

from __future__ import annotations

import argparse
import json
import os
import sys

from appliance.engines.manifest import verify_prepared
from appliance.engines.runner import OFFLINE_ENV, configured_specs, engine_command, engine_env, engine_python
from appliance.lib.errors import ApplianceError
from appliance.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    engines = sub.add_parser("engines", help="the vLLM engines of this appliance")
    engines_sub = engines.add_subparsers(dest="engines_command", required=True)
    engines_sub.add_parser("list", help="every engine: name, model, URL, runner (JSON)")
    run = engines_sub.add_parser(
        "exec", help="replace this process with one engine (a node's vllm-<name>.service runs this)"
    )
    run.add_argument("name", help="the engine: the model's name, or <model>-<N> for its N-th extra replica")
    run.add_argument("--print", action="store_true", help="print the command and environment instead")


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        specs = configured_specs(settings)
    except ApplianceError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if args.engines_command == "list":
        rows = [{"name": s.name, "model": s.manifest.name, "url": s.url, "runner": s.manifest.runner} for s in specs]
        print(json.dumps(rows, indent=2))
        return 0
    index = next((i for i, spec in enumerate(specs) if spec.name == args.name), None)
    if index is None:
        known = ", ".join(spec.name for spec in specs) or "none"
        print(f"error: no engine {args.name!r} in [engines] (known: {known})", file=sys.stderr)
        return 2
    spec = specs[index]
    try:
        verify_prepared(spec.manifest, spec.model_dir)  # the weights are checked before every start
        command = engine_command(spec, engine_python(settings), settings)
    except ApplianceError as exc:
        print(f"error: engine {spec.name}: {exc.message}", file=sys.stderr)
        return 1
    env = engine_env(settings, spec, index)
    if args.print:
        prefixes = ("VLLM_", "GLOO_", "MALLOC_", "ONEDNN_")
        own = {k: v for k, v in env.items() if k in OFFLINE_ENV or k.startswith(prefixes)}
        print(json.dumps({"command": command, "env": own}))  # what the engine's environment sets, whatever ours is
        return 0
    sys.stdout.flush()
    os.execve(command[0], command, env)  # noqa: S606 (the engine's own python, from the settings)
    return 1  # not reached

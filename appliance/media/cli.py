"""``appliance media keygen|build|verify``: the signed offline install media."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from appliance.engines.manifest import MANIFEST_FILE
from appliance.media import signing
from appliance.media.bundle import MediaBuilder, MediaError, parse_component, verify_media
from appliance.settings import REPO_ROOT, Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    media = sub.add_parser("media", help="signed offline install media")
    media_sub = media.add_subparsers(dest="media_command", required=True)
    keygen = media_sub.add_parser("keygen", help="an Ed25519 key pair for signing media")
    keygen.add_argument("--out", type=Path, required=True, help="folder for media-signing-key.pem and .pub.pem")
    build = media_sub.add_parser("build", help="assemble and sign a media directory (the only step with network)")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    build.add_argument("--signing-key", type=Path, required=True)
    build.add_argument("--wheels", type=Path, action="append", default=[], help="a folder of wheels to include")
    build.add_argument("--model", action="append", help="bundled model to include (default: every prepared one)")
    build.add_argument("--component", action="append", default=[], help="NAME=PATH[@VERSION], e.g. qdrant=./qdrant")
    build.add_argument(
        "--download",
        choices=("appliance", "all"),
        help="fetch wheels from the package index (the only step with network): the appliance's dependencies, "
        "or those and the engines' (vLLM, torch)",
    )
    verify = media_sub.add_parser("verify", help="check a media directory against its signed manifest")
    verify.add_argument("directory", type=Path)
    verify.add_argument("--pubkey", type=Path, required=True)
    verify.add_argument("--json", action="store_true")


def add_install_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    install = sub.add_parser("install", help="verify offline media, then provision the node with its playbooks")
    install.add_argument("--media", type=Path, required=True)
    install.add_argument("-i", "--inventory", type=Path, required=True)
    install.add_argument("--pubkey", type=Path, required=True, help="the site's trusted media-signing public key")
    install.add_argument("-e", "--extra-var", action="append", default=[], help="KEY=JSON_OR_TEXT, passed to Ansible")
    install.add_argument("--json", action="store_true", help="print the play recap as JSON at the end")


def add_node_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = sub.add_parser("node", help="this node's own record of what was installed on it")
    node_sub = node.add_subparsers(dest="node_command", required=True)
    record = node_sub.add_parser(
        "record-install", help="audit the media just installed (the playbooks' last task); JSON {changed}"
    )
    record.add_argument("--version", required=True, help="the media's appliance version")
    record.add_argument("--manifest-sha256", required=True, help="sha256 of the media's manifest.json")


def run_node(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.media.node import record_install

    print(json.dumps(record_install(settings, args.version, args.manifest_sha256)))
    return 0


def run_install(args: argparse.Namespace) -> int:
    from appliance.media.install import install

    extra: dict[str, object] = {}
    for item in args.extra_var:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: -e takes KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    try:
        rc, recap = install(args.media, args.inventory, args.pubkey, extra)
    except (MediaError, signing.SignatureError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"rc": rc, **recap}))
    return 0 if rc == 0 else 1


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.media_command == "keygen":
            args.out.mkdir(parents=True, exist_ok=True)
            private, public = args.out / "media-signing-key.pem", args.out / "media-signing-key.pub.pem"
            signing.generate(private, public)
            print(json.dumps({"private_key": str(private), "public_key": str(public)}))
            return 0
        if args.media_command == "build":
            return _build(settings, args)
        started = time.perf_counter()
        manifest = verify_media(args.directory, args.pubkey)
        summary = {"ok": True, "files": len(manifest["files"]), "profile": manifest["profile"],
                   "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
        print(json.dumps(summary) if args.json else f"media verified: {summary['files']} files, signature good")
        return 0
    except (MediaError, signing.SignatureError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _build(settings: Settings, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    builder = MediaBuilder(args.out, args.profile)
    appliance_version = builder.add_own_wheel(REPO_ROOT)
    for folder in args.wheels:
        builder.add_wheels(folder, f"local:{folder}")
    if args.download:
        requirements = []
        if args.download == "all":
            requirements = [REPO_ROOT / "requirements" / f"engine-{args.profile}.txt"]
        own = sorted((args.out / "wheels").glob("appliance-*.whl"))
        builder.download(requirements, own)
    names = args.model or [
        path.parent.name
        for path in sorted(settings.models_dir.glob(f"*/{MANIFEST_FILE}"))
        if (settings.prepared_models_dir / path.parent.name).is_dir()
    ]
    for name in names:
        builder.add_model(settings.models_dir / name / MANIFEST_FILE, settings.prepared_models_dir / name)
    builder.add_tree(REPO_ROOT / "playbooks", "playbooks", "playbooks", appliance_version, "repository")
    builder.add_tree(REPO_ROOT / "deploy", "deploy", "operator-kit", appliance_version, "repository")
    for text in args.component:
        builder.add_component(parse_component(text))
    manifest = builder.finish(args.signing_key, appliance_version)
    size = sum(item["size"] for item in manifest["files"])
    print(json.dumps({"out": str(args.out), "files": len(manifest["files"]), "bytes": size,
                      "models": names, "seconds": round(time.perf_counter() - started, 3)}))  # fmt: skip
    return 0

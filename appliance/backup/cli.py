"""``appliance backup --out FILE`` and ``appliance restore FILE``."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from pathlib import Path

from appliance.settings import Settings

PASSPHRASE_ENV = "APPLIANCE_BACKUP_PASSPHRASE"  # noqa: S105 (the variable's name, not a value)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = sub.add_parser(
        "backup", help="write the database, secrets, audit files, vector store and configuration to one encrypted file"
    )
    backup.add_argument("--out", type=Path, required=True, help="the backup file (written 0600, all or nothing)")
    _common(backup)
    restore = sub.add_parser("restore", help="put a backup back (the appliance stopped); verifies it all first")
    restore.add_argument("file", type=Path)
    restore.add_argument(
        "--restore-config",
        action="store_true",
        help="also replace this node's configuration files with the backup's (default: keep this node's)",
    )
    restore.add_argument("--verify-only", action="store_true", help="check the backup; change nothing")
    _common(restore)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--passphrase-file", type=Path, help=f"file holding the passphrase (default: ${PASSPHRASE_ENV})"
    )
    parser.add_argument("--json", action="store_true", help="a JSON summary on standard output")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on standard error")


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if args.passphrase_file is not None:
        text = args.passphrase_file.read_text(encoding="utf-8")
    else:
        text = os.environ.get(PASSPHRASE_ENV, "")
    text = text.rstrip("\r\n")
    return text.encode() if text else None


def run(settings: Settings, args: argparse.Namespace) -> int:
    from appliance.backup.archive import ArchiveError
    from appliance.backup.create import BackupError, create_backup
    from appliance.backup.layout import Layout, running_reason
    from appliance.backup.restore import RestoreError, restore_backup
    from appliance.lib.progress import Progress

    try:
        passphrase = _passphrase(args)
    except OSError as exc:
        print(f"error: cannot read the passphrase file: {exc.strerror}", file=sys.stderr)
        return 2
    if passphrase is None:
        print(
            f"error: a backup is encrypted with a passphrase: give --passphrase-file FILE or set {PASSPHRASE_ENV} "
            "(keep the passphrase apart from the backups: without it they cannot be restored)",
            file=sys.stderr,
        )
        return 2
    layout = Layout.of(settings)
    progress = Progress(enabled=not args.quiet)
    try:
        if args.command == "backup":
            summary = create_backup(layout, args.out, passphrase, progress)
        else:
            reason = None if args.verify_only else running_reason(settings, layout)
            if reason is not None:
                print(f"error: {reason}; nothing was restored", file=sys.stderr)
                return 1
            summary = restore_backup(
                layout,
                args.file,
                passphrase,
                progress,
                restore_config=args.restore_config,
                verify_only=args.verify_only,
            )
    except (BackupError, RestoreError, ArchiveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as exc:
        print(f"error: {exc}; nothing was {'written' if args.command == 'backup' else 'restored'}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print(args.command, summary, bool(args.verify_only) if args.command == "restore" else False)
    return 0


def _print(command: str, summary: dict[str, object], verify_only: bool) -> None:
    if command == "backup":
        print(f"backup written: {summary['file']} ({summary['files']} files, {summary['size']} bytes)")
        vectors = summary["vector_store"]
        if isinstance(vectors, dict) and not vectors.get("included") and vectors.get("note"):
            print(f"note: {vectors['note']}")
        return
    if verify_only:
        print(f"backup OK: {summary['file']} verified (passphrase, every frame, every member's sha256)")
        return
    restored = summary["restored"]
    assert isinstance(restored, list)
    for item in restored:
        print(f"restored {item['part']:<9} -> {item['to']}")
    removed = summary.get("removed", [])
    assert isinstance(removed, list)
    for item in removed:
        print(f"removed  {item['part']:<9} {item['path']} (the backed-up node had none)")
    skipped = summary["skipped"]
    assert isinstance(skipped, list)
    for item in skipped:
        print(f"skipped  {item['part']:<9} ({item['why']})")
    if summary["migrates_on_next_start"]:
        print(f"the database (schema {summary['schema_revision']}) is migrated when the appliance next starts")
    print("start the appliance to use the restored node (`appliance up`, or `systemctl start appliance`)")

"""``appliance audit verify | export | prune``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.audit.export import jsonl, syslog
from appliance.audit.setup import audit_store
from appliance.lib.times import as_utc, duration_s
from appliance.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain and every signed checkpoint")
    verify.add_argument("--json", action="store_true")
    export = audit_sub.add_parser("export", help="write records to standard output for a SIEM")
    export.add_argument("--since", type=_moment, help="ISO 8601 time, or an age such as 24h")
    export.add_argument("--format", choices=("jsonl", "syslog"), default="jsonl")
    prune = audit_sub.add_parser(
        "prune",
        help="archive and delete old records (an anchor keeps the rest valid); delete captured content past "
        "audit.content_retention_days",
    )
    prune.add_argument("--older-than", type=duration_s, help="age such as 90d (default: audit.retention_days)")
    prune.add_argument("--archive", required=True, help="JSON lines file the pruned records are appended to")


def _moment(text: str) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        return datetime.now(UTC) - timedelta(seconds=duration_s(text))


def run(settings: Settings, args: argparse.Namespace) -> int:
    store = audit_store(settings)
    if args.audit_command == "verify":
        result = store.verify()
        if args.json:
            print(json.dumps(result.as_dict(), indent=2))
        elif result.ok:
            print(
                f"audit chain OK: {result.records} records ({result.first_seq}..{result.last_seq}), "
                f"{result.checkpoints} signed checkpoints"
            )
        else:
            print(f"audit chain BROKEN at record {result.first_bad_seq}: {result.reason}", file=sys.stderr)
        return 0 if result.ok else 2
    if args.audit_command == "export":
        render = syslog if args.format == "syslog" else jsonl
        for record in store.export(args.since):
            sys.stdout.write(render(record) + "\n")
        return 0
    now = datetime.now(UTC)
    content = store.prune_content(now - timedelta(days=settings.audit.content_retention_days))
    print(f"deleted {content} captured prompts and answers older than {settings.audit.content_retention_days} days")
    age = args.older_than or (settings.audit.retention_days or 0) * 86400
    if not age:
        print("audit records kept: give --older-than or set APPLIANCE_AUDIT__RETENTION_DAYS to prune them")
        return 0
    pruned = store.prune(now - timedelta(seconds=age), Path(args.archive))
    print(f"pruned {pruned} records into {args.archive}")
    return 0

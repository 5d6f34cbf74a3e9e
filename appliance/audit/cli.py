"""``appliance audit verify | export | prune | checkpoint | prove | check-proof | witness-import | witnessed``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from appliance.audit.export import jsonl, syslog
from appliance.audit.merkle import ProofError
from appliance.audit.proofs import check_proof
from appliance.audit.setup import audit_store, cosigned_checkpoints
from appliance.audit.store import AuditStore
from appliance.audit.tree import TreeError
from appliance.audit.witness import CosignatureError
from appliance.lib.times import as_utc, duration_s
from appliance.settings import Settings


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="the tamper-evident audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain and every signed checkpoint")
    verify.add_argument("--json", action="store_true")
    verify.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="FILE",
        help="also check that the database holds the tree of this checkpoint (a witness's or an auditor's own copy)",
    )
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
    checkpoint = audit_sub.add_parser(
        "checkpoint", help="sign a checkpoint of every record now and print it (C2SP tlog-checkpoint)"
    )
    shown = checkpoint.add_mutually_exclusive_group()
    shown.add_argument("--vkey", action="store_true", help="print the key that verifies it (C2SP signed-note vkey)")
    shown.add_argument(
        "--witness",
        type=int,
        metavar="OLD_SIZE",
        help="print a C2SP tlog-witness add-checkpoint request from the size the witness last co-signed",
    )
    prove = audit_sub.add_parser("prove", help="RFC 6962 inclusion proof of a record, or consistency proof (JSON)")
    what = prove.add_mutually_exclusive_group(required=True)
    what.add_argument("--seq", type=int, help="the record to prove included")
    what.add_argument("--old", type=int, help="the earlier tree size to prove consistent with")
    prove.add_argument("--size", type=int, help="tree size to prove against (default: the newest checkpoint)")
    check = audit_sub.add_parser(
        "check-proof", help="check a proof from `prove` offline, against the log's verifier key (needs no database)"
    )
    check.add_argument("proof", help="the JSON file `appliance audit prove` wrote (- for standard input)")
    check.add_argument("--vkey", required=True, help="the log's verifier key, as `checkpoint --vkey` prints it")
    check.add_argument("--old-checkpoint", help="for a consistency proof: the earlier checkpoint you kept (file)")
    imported = audit_sub.add_parser(
        "witness-import",
        help="keep a checkpoint a trusted witness co-signed (C2SP tlog-cosignature; audit.witnesses)",
    )
    imported.add_argument("note", help="the co-signed checkpoint the witness returned (file, - for standard input)")
    audit_sub.add_parser("witnessed", help="each trusted witness's newest co-signed checkpoint (JSON)")


def _moment(text: str) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        return datetime.now(UTC) - timedelta(seconds=duration_s(text))


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.audit_command == "check-proof":
        text = sys.stdin.read() if args.proof == "-" else Path(args.proof).read_text(encoding="utf-8")
        old = Path(args.old_checkpoint).read_text(encoding="utf-8") if args.old_checkpoint else None
        problem = check_proof(json.loads(text), args.vkey, old)
        if problem is not None:
            print(f"proof does NOT verify: {problem}", file=sys.stderr)
            return 2
        print("proof verifies against the signed checkpoint")
        return 0
    store = audit_store(settings)
    if args.audit_command in ("checkpoint", "prove"):
        return _checkpoint_or_prove(store, args)
    if args.audit_command in ("witness-import", "witnessed"):
        return _witnesses(settings, store, args)
    if args.audit_command == "verify":
        result = store.verify()
        witnesses = cosigned_checkpoints(settings, store)
        contradicted = witnesses.problems() if result.ok else []
        for path in args.against if result.ok else []:
            problem = witnesses.contradiction(Path(path).read_text(encoding="utf-8"))
            if problem:
                contradicted.append(f"{path}: {problem}")
        if args.json:
            print(json.dumps({**result.as_dict(), "witness_problems": contradicted}, indent=2))
        elif result.ok and not contradicted:
            print(
                f"audit chain OK: {result.records} records ({result.first_seq}..{result.last_seq}), "
                f"{result.checkpoints} signed checkpoints"
            )
        elif contradicted:
            print(f"audit log CONTRADICTS checkpoints kept outside it: {'; '.join(contradicted)}", file=sys.stderr)
        else:
            print(f"audit chain BROKEN at record {result.first_bad_seq}: {result.reason}", file=sys.stderr)
        return 0 if result.ok and not contradicted else 2
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


def _witnesses(settings: Settings, store: AuditStore, args: argparse.Namespace) -> int:
    try:
        witnesses = cosigned_checkpoints(settings, store)
    except ValueError as exc:
        print(f"error: audit.witnesses: {exc}", file=sys.stderr)
        return 2
    if args.audit_command == "witnessed":
        print(json.dumps(witnesses.listing(), indent=2))
        return 0
    note = sys.stdin.read() if args.note == "-" else Path(args.note).read_text(encoding="utf-8")
    try:
        print(json.dumps(witnesses.import_note(note), indent=2))
    except CosignatureError as exc:
        print(f"refused: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _checkpoint_or_prove(store: AuditStore, args: argparse.Namespace) -> int:
    try:
        if args.audit_command == "prove":
            if args.seq is not None:
                print(json.dumps(store.prove_inclusion(args.seq, args.size), indent=2, default=str))
            else:
                print(json.dumps(store.prove_consistency(args.old, args.size), indent=2, default=str))
            return 0
        store.checkpoint()
        if args.vkey:
            print(store.key.vkey())
        elif args.witness is not None:
            sys.stdout.write(store.witness_request(args.witness))
        else:
            latest = store.latest_checkpoint()
            if latest is None:
                print("no records yet: nothing to sign", file=sys.stderr)
                return 1
            sys.stdout.write(latest["note"])
        return 0
    except (ProofError, TreeError) as exc:
        print(f"cannot: {exc}", file=sys.stderr)
        return 1

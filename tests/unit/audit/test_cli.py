"""`appliance audit` on a real data directory."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent
from appliance.settings import AuditSettings, Settings


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"APPLIANCE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "APPLIANCE_CONFIG": str(tmp_path / "no.toml")}
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "audit", *args], env=env, capture_output=True, text=True
    )


def test_verify_export_and_prune(tmp_path: Path) -> None:
    store = audit_store(Settings(data_dir=tmp_path))
    store.append([AuditEvent("admin.tenants.create", "success", subject='ali"ce]', detail={"n": n}) for n in range(5)])
    ok = cli(tmp_path, "verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["records"] == 5

    lines = cli(tmp_path, "export", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4, 5]
    syslog = cli(tmp_path, "export", "--format", "syslog", "--since", "1h").stdout.splitlines()
    assert len(syslog) == 5
    # RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD-ID params] MSG
    assert re.match(r'^<109>1 \S+Z \S+ appliance gateway admin\.tenants\.create \[audit@32473 seq="1" ', syslog[0])
    assert 'subject="ali\\"ce\\]"' in syslog[0]

    sqlite3.connect(tmp_path / "appliance.db", isolation_level=None).execute(
        "UPDATE audit_records SET ts = '2000-01-01 00:00:00.000000' WHERE seq <= 2"
    )
    pruned = cli(tmp_path, "prune", "--older-than", "30d", "--archive", str(tmp_path / "archive.jsonl"))
    assert pruned.returncode == 0 and "pruned 2" in pruned.stdout
    assert cli(tmp_path, "verify").returncode == 0

    sqlite3.connect(tmp_path / "appliance.db", isolation_level=None).execute(
        "UPDATE audit_records SET outcome = 'denied' WHERE seq = 4"
    )
    broken = cli(tmp_path, "verify")
    assert broken.returncode == 2 and "record 4" in broken.stderr


def test_checkpoint_prove_and_check_proof_as_an_outside_auditor_would(tmp_path: Path) -> None:
    store = audit_store(Settings(data_dir=tmp_path))
    store.append([AuditEvent("admin.tenants.create", "success", subject="alice", detail={"n": n}) for n in range(3)])
    first = cli(tmp_path, "checkpoint")
    assert first.returncode == 0 and first.stdout.split("\n")[1] == "3", first.stderr
    (tmp_path / "first-checkpoint").write_text(first.stdout)
    store.append([AuditEvent("admin.tenants.create", "success", subject="bob", detail={"n": n}) for n in range(4)])
    vkey = cli(tmp_path, "checkpoint", "--vkey").stdout.strip()
    assert vkey.split("+")[0] == first.stdout.split("\n")[0], "the key is named after the log's origin"

    inclusion = cli(tmp_path, "prove", "--seq", "2")
    assert inclusion.returncode == 0 and json.loads(inclusion.stdout)["tree_size"] == 7
    (tmp_path / "inclusion.json").write_text(inclusion.stdout)
    checked = cli(tmp_path, "check-proof", str(tmp_path / "inclusion.json"), "--vkey", vkey)
    assert checked.returncode == 0, checked.stderr

    consistency = cli(tmp_path, "prove", "--old", "3")
    (tmp_path / "consistency.json").write_text(consistency.stdout)
    old = ("--old-checkpoint", str(tmp_path / "first-checkpoint"))
    assert cli(tmp_path, "check-proof", str(tmp_path / "consistency.json"), "--vkey", vkey, *old).returncode == 0

    tampered = json.loads(inclusion.stdout)
    tampered["record"]["subject"] = "mallory"
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    refused = cli(tmp_path, "check-proof", str(tmp_path / "tampered.json"), "--vkey", vkey)
    assert refused.returncode == 2 and "does not hash" in refused.stderr

    witness = cli(tmp_path, "checkpoint", "--witness", "3")
    assert witness.returncode == 0 and witness.stdout.startswith("old 3\n")
    assert cli(tmp_path, "prove", "--seq", "99").returncode == 1


def test_the_log_is_named_after_the_node_or_its_setting(tmp_path: Path) -> None:
    named = audit_store(Settings(data_dir=tmp_path / "a", audit=AuditSettings(node="rack 3+gpu")))
    assert named.origin == "rack-3-gpu/audit", "a log's name has no spaces nor '+'"
    named.append([AuditEvent("admin.tenants.create", "success")])
    named.settle()
    assert named.verify().ok
    chosen = audit_store(Settings(data_dir=tmp_path / "b", audit=AuditSettings(origin="audit.example.org/n1")))
    assert chosen.origin == chosen.key.name == "audit.example.org/n1"
    assert chosen.key.vkey().startswith("audit.example.org/n1+")

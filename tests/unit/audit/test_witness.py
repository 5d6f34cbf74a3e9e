"""Witness co-signatures (C2SP tlog-cosignature, Ed25519 cosignature/v1): the test plays the witness with its own
key, builds the signed message and key id from the specification (not from the appliance's code), and checks what
``appliance audit witness-import`` keeps and refuses, and that ``verify`` catches a database that contradicts a
checkpoint a witness co-signed."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.setup import audit_store, cosigned_checkpoints
from appliance.audit.store import AuditEvent
from appliance.audit.witness import Cosignature, CosignatureError, Cosigner, cosign, cosignatures
from appliance.settings import AuditSettings, Settings

WITNESS = "witness.example.org/w1"
NOTE_ED25519 = b"\x01"  # the signed-note signature type of a plain Ed25519 note signature


def vkey_by_the_spec(name: str, key: Ed25519PrivateKey) -> str:
    """``<name>+<hex(SHA-256(name || "\\n" || 0x04 || key)[:4])>+<base64(0x04 || key)>``, written from the
    specification."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(name.encode() + b"\n\x04" + raw).digest()[:4]
    blob = base64.b64encode(b"\x04" + raw).decode()
    return f"{name}+{key_id.hex()}+{blob}"


def cosign_by_the_spec(key: Ed25519PrivateKey, name: str, note: str, timestamp: int) -> str:
    body = note.partition("\n\n")[0] + "\n"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = hashlib.sha256(name.encode() + b"\n\x04" + raw).digest()[:4]
    signature = key.sign(b"cosignature/v1\ntime " + str(timestamp).encode() + b"\n" + body.encode())
    return note + f"\u2014 {name} {base64.b64encode(key_id + struct.pack('>Q', timestamp) + signature).decode()}\n"


@pytest.fixture
def witness_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def settings_for(data_dir: Path, *vkeys: str) -> Settings:
    return Settings(data_dir=data_dir, audit=AuditSettings(witnesses=list(vkeys), checkpoint_every=1000))


def log_with(settings: Settings, count: int, tag: str = "a") -> str:
    store = audit_store(settings)
    store.append([AuditEvent("admin.tenants.create", "success", subject=tag, detail={"n": n}) for n in range(count)])
    store.checkpoint()
    latest = store.latest_checkpoint()
    assert latest is not None
    return str(latest["note"])


def test_the_key_id_and_signature_match_the_specification(witness_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    vkey = vkey_by_the_spec(WITNESS, witness_key)
    assert Cosigner.from_vkey(vkey).vkey() == vkey
    note = log_with(settings_for(tmp_path), 3)
    ours, theirs = (
        cosign(witness_key, WITNESS, note, 1_700_000_000),
        cosign_by_the_spec(witness_key, WITNESS, note, 1_700_000_000),
    )
    assert ours == theirs  # Ed25519 is deterministic: the same bytes as the specification's construction
    assert cosignatures(theirs, [Cosigner.from_vkey(vkey)]) == [Cosignature(WITNESS, 1_700_000_000)]
    raw = witness_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    note_key = hashlib.sha256(WITNESS.encode() + b"\n\x01" + raw).digest()[:4].hex()
    with pytest.raises(ValueError, match="signature type 0x04"):  # an Ed25519 note key is not a cosigner key
        Cosigner.from_vkey(f"{WITNESS}+{note_key}+{base64.b64encode(NOTE_ED25519 + raw).decode()}")


def test_a_cosigned_checkpoint_is_kept_and_what_is_not_one_is_refused(
    witness_key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path / "node", vkey_by_the_spec(WITNESS, witness_key))
    note = log_with(settings, 3)
    now = int(time.time())
    witnessed = cosigned_checkpoints(settings, audit_store(settings))
    kept = witnessed.import_note(cosign_by_the_spec(witness_key, WITNESS, note, now))
    assert kept == {"tree_size": 3, "witnesses": [WITNESS], "kept": [WITNESS]}
    [row] = witnessed.listing()
    assert row["witness"] == WITNESS and row["tree_size"] == 3 and row["problem"] is None

    stranger = Ed25519PrivateKey.generate()
    refusals = {
        "no cosignature by a trusted witness": cosign_by_the_spec(stranger, WITNESS, note, now),
        "no cosignature by a trusted witness verifies": cosign_by_the_spec(stranger, "other.example/w", note, now),
        "not a checkpoint of this log": cosign_by_the_spec(
            witness_key, WITNESS, note.replace("\n3\n", "\n2\n", 1), now
        ),
    }
    future = cosign_by_the_spec(witness_key, WITNESS, note, now + 3600)
    refusals["no cosignature by a trusted witness verifies"] = future  # dated an hour ahead
    for reason, text in refusals.items():
        with pytest.raises(CosignatureError, match=reason):
            witnessed.import_note(text)
    other_log = log_with(settings_for(tmp_path / "elsewhere"), 3)
    with pytest.raises(CosignatureError, match="not a checkpoint of this log"):
        witnessed.import_note(cosign_by_the_spec(witness_key, WITNESS, other_log, now))

    # An older checkpoint co-signed later does not replace the newer one the witness already vouched for.
    newer = log_with(settings, 2)
    assert witnessed.import_note(cosign_by_the_spec(witness_key, WITNESS, newer, now))["kept"] == [WITNESS]
    assert witnessed.import_note(cosign_by_the_spec(witness_key, WITNESS, note, now))["kept"] == []
    assert witnessed.listing()[0]["tree_size"] == 5


def test_verify_fails_when_the_database_contradicts_a_witness(witness_key: Ed25519PrivateKey, tmp_path: Path) -> None:
    """The database rolled back and rewritten with the node's own key (re-signed checkpoints included): the chain
    alone cannot tell, the witness's co-signed checkpoint can."""
    vkey = vkey_by_the_spec(WITNESS, witness_key)
    settings = settings_for(tmp_path, vkey)
    note = log_with(settings, 4)
    cosigned_checkpoints(settings, audit_store(settings)).import_note(
        cosign_by_the_spec(witness_key, WITNESS, note, int(time.time()))
    )
    env = {
        "APPLIANCE_DATA_DIR": str(tmp_path),
        "APPLIANCE_AUDIT__WITNESSES": json.dumps([vkey]),
        "PATH": "/usr/bin:/bin",
        "APPLIANCE_CONFIG": str(tmp_path / "no.toml"),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", "audit", *args], env=env, capture_output=True, text=True
        )

    assert cli("verify").returncode == 0
    assert json.loads(cli("witnessed").stdout)[0]["tree_size"] == 4

    (tmp_path / "appliance.db").unlink()  # the database replaced: same key, other history
    (tmp_path / "audit" / "latest-checkpoint").unlink()
    log_with(settings, 6, tag="rewritten")
    verify = cli("verify")
    assert verify.returncode == 2, verify.stdout + verify.stderr
    assert "CONTRADICTS its witnesses" in verify.stderr and "its root differs" in verify.stderr
    refused = cli("witness-import", "-")
    assert refused.returncode == 1 and "refused" in refused.stderr

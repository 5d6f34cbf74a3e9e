"""Witness co-signatures (C2SP tlog-cosignature, Ed25519 cosignature/v1): the test plays the witness with its own
key, builds the signed message and key id from the specification (not from the appliance's code), and checks what
``appliance audit witness-import`` keeps and refuses, and that ``verify`` catches a database that contradicts a
checkpoint a witness co-signed."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
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
    key_id = vkey.split("+", 2)[1]
    assert cosignatures(theirs, [Cosigner.from_vkey(vkey)]) == [Cosignature(WITNESS, 1_700_000_000, key_id)]
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

    def cli(*args: str, note: str = "") -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "appliance.cli", "audit", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, input=note)

    assert cli("verify").returncode == 0
    assert json.loads(cli("witnessed").stdout)[0]["tree_size"] == 4

    (tmp_path / "appliance.db").unlink()  # the database replaced: same key, other history
    (tmp_path / "audit" / "latest-checkpoint").unlink()
    log_with(settings, 6, tag="rewritten")
    verify = cli("verify")
    assert verify.returncode == 2, verify.stdout + verify.stderr
    assert "CONTRADICTS checkpoints kept outside it" in verify.stderr and "its root differs" in verify.stderr
    # The witness's own copy says the same to an auditor, whatever the node kept.
    witness_copy = tmp_path / "witness-copy.note"
    witness_copy.write_text(cosign_by_the_spec(witness_key, WITNESS, note, int(time.time())))
    shutil.rmtree(tmp_path / "audit" / "cosigned")
    assert cli("verify").returncode == 0  # the node's copies gone: only an outside copy can show it now
    against = cli("verify", "--against", str(witness_copy))
    assert against.returncode == 2 and "its root differs" in against.stderr, against.stderr
    refused = cli("witness-import", "-", note=witness_copy.read_text())
    assert refused.returncode == 1 and "does not hold: its root differs" in refused.stderr, refused.stderr


def test_a_rotated_witness_key_starts_afresh_and_bad_keys_are_refused_at_start(tmp_path: Path) -> None:
    old_key, new_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    settings = settings_for(tmp_path, vkey_by_the_spec(WITNESS, old_key))
    note = log_with(settings, 3)
    cosigned_checkpoints(settings, audit_store(settings)).import_note(
        cosign_by_the_spec(old_key, WITNESS, note, int(time.time()))
    )
    rotated = settings_for(tmp_path, vkey_by_the_spec(WITNESS, new_key))
    witnessed = cosigned_checkpoints(rotated, audit_store(rotated))
    assert witnessed.listing() == [{"witness": WITNESS, "tree_size": None}] and witnessed.problems() == []
    newer = log_with(rotated, 1)
    assert witnessed.import_note(cosign_by_the_spec(new_key, WITNESS, newer, int(time.time())))["kept"] == [WITNESS]
    assert witnessed.listing()[0]["tree_size"] == 4

    good = vkey_by_the_spec(WITNESS, old_key)
    name, key_id, blob = good.split("+", 2)
    for bad in (f"{name}+00000000+{blob}", f"two words+{key_id}+{blob}", "not-a-key"):
        with pytest.raises(ValueError, match=r"audit\.witnesses"):
            AuditSettings(witnesses=[bad])
    with pytest.raises(ValueError, match="listed twice"):
        AuditSettings(witnesses=[good, good])

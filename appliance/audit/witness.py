"""Witness co-signatures of the log's checkpoints (C2SP tlog-cosignature, Ed25519 ``cosignature/v1``).

A witness that checked the log's consistency (from the add-checkpoint request ``appliance audit checkpoint
--witness`` prints) returns the checkpoint with its own signature line. Imported here, the cosigned checkpoint is
kept only if it is the log's own (its signature verifies), states the tree this database holds at that size
(same root), and carries a cosignature of a witness the site trusts (``audit.witnesses``, verifier keys) that
verifies. The newest cosigned checkpoint of each witness is kept beside the audit key, and ``verify`` checks that
the database still holds the trees they state: a rollback or rewrite of the database below a cosigned size can
then no longer be hidden by re-signing, since the witness's copy is outside the node."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit.chain import Checkpoint, open_checkpoint
from appliance.audit.store import AuditStore
from appliance.audit.tree import TreeError
from appliance.lib.errors import InvalidRequestError

COSIGNATURE_V1 = b"\x04"  # the signed-note signature type of an Ed25519 cosignature/v1
EM_DASH = "\u2014"


class CosignatureError(InvalidRequestError):
    code = "cosignature_refused"


@dataclass(frozen=True)
class Cosigner:
    """A witness's verifier key: ``<name>+<hex key id>+<base64(0x04 || Ed25519 public key)>``."""

    name: str
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(self.name.encode() + b"\n" + COSIGNATURE_V1 + raw).digest()[:4]

    def vkey(self) -> str:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"{self.name}+{self.key_id.hex()}+{base64.b64encode(COSIGNATURE_V1 + raw).decode()}"

    @classmethod
    def from_vkey(cls, vkey: str) -> Cosigner:
        name, _, rest = vkey.strip().partition("+")
        key_id, _, blob = rest.partition("+")
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError:
            raw = b""
        if not name or len(raw) != 33 or raw[:1] != COSIGNATURE_V1:
            raise ValueError(f"{vkey!r} is not an Ed25519 cosignature/v1 verifier key (signature type 0x04)")
        cosigner = cls(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if cosigner.key_id.hex() != key_id:
            raise ValueError(f"{vkey!r}: the key id does not match its name and key")
        return cosigner


def signed_message(body: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body.encode()


def cosign(private: Ed25519PrivateKey, name: str, note: str, timestamp: int) -> str:
    """``note`` with one more signature line: what a witness returns (the tests play the witness with it)."""
    body = note.partition("\n\n")[0] + "\n"
    cosigner = Cosigner(name, private.public_key())
    signature = private.sign(signed_message(body, timestamp))
    blob = base64.b64encode(cosigner.key_id + struct.pack(">Q", timestamp) + signature).decode()
    return f"{note}{EM_DASH} {name} {blob}\n"


@dataclass(frozen=True)
class Cosignature:
    witness: str
    timestamp: int
    key_id: str = ""  # hex: which of the witness's keys (a witness may be trusted under two keys while it rotates)


def cosignatures(note: str, cosigners: list[Cosigner]) -> list[Cosignature]:
    """The cosignatures on ``note`` by these witnesses that verify (other signature lines are passed over)."""
    body, sep, lines = note.partition("\n\n")
    if not sep:
        return []
    body += "\n"
    by_id = {(cosigner.name, cosigner.key_id): cosigner for cosigner in cosigners}
    found: list[Cosignature] = []
    for line in lines.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != EM_DASH:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            continue
        cosigner = by_id.get((parts[1], blob[:4]))
        if cosigner is None or len(blob) != 4 + 8 + 64:
            continue
        (timestamp,) = struct.unpack(">Q", blob[4:12])
        try:
            cosigner.public.verify(blob[12:], signed_message(body, timestamp))
        except InvalidSignature:
            continue
        if timestamp < 2**63:
            found.append(Cosignature(cosigner.name, timestamp, cosigner.key_id.hex()))
    return found


class CosignedCheckpoints:
    """The newest cosigned checkpoint of each trusted witness, kept as files beside the audit key."""

    def __init__(self, store: AuditStore, folder: Path, witnesses: list[str]) -> None:
        self._store = store
        self._folder = folder
        self._cosigners = [Cosigner.from_vkey(vkey) for vkey in witnesses]

    def import_note(self, note: str, *, now: datetime | None = None) -> dict[str, Any]:
        """Keep ``note`` for each trusted witness that cosigned it, if it is newer than what that witness's
        file holds. Refuses (CosignatureError) a note that is not this log's, states another tree than the
        database's, or has no cosignature of a trusted witness that verifies, or one dated in the future."""
        if not self._cosigners:
            raise CosignatureError("no witness is trusted: set audit.witnesses to the witnesses' verifier keys")
        checkpoint = self._checkpoint(note)
        moment = (now or datetime.now(UTC)).timestamp()
        signed = [c for c in cosignatures(note, self._cosigners) if c.timestamp <= moment + 300]
        if not signed:
            raise CosignatureError("no cosignature by a trusted witness verifies on this checkpoint")
        self._folder.mkdir(parents=True, exist_ok=True)
        kept = []
        with (self._folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one import at a time: a newer note is never replaced by an older
            for cosignature in signed:
                path = self._path(cosignature.witness, cosignature.key_id)
                held = self._read(path)
                if held is not None and (held["tree_size"] or 0) >= checkpoint.tree_size:
                    continue
                staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                staging.write_text(note, encoding="utf-8")
                os.replace(staging, path)
                kept.append(cosignature.witness)
        return {
            "tree_size": checkpoint.tree_size,
            "witnesses": [c.witness for c in signed],
            "kept": kept,
        }

    def listing(self) -> list[dict[str, Any]]:
        """Each trusted witness's newest cosigned checkpoint, and whether the database still holds its tree."""
        rows = []
        for cosigner in self._cosigners:
            held = self._read(self._path(cosigner.name, cosigner.key_id.hex()))
            if held is None:
                rows.append({"witness": cosigner.name, "tree_size": None})
                continue
            rows.append(held)
        return rows

    def problems(self) -> list[str]:
        """Why the database contradicts a checkpoint a witness cosigned (empty: it holds every such tree)."""
        return [
            f"{row['witness']} cosigned a tree of {row['tree_size']} records that {row['problem']}"
            for row in self.listing()
            if row.get("problem")
        ]

    def _checkpoint(self, note: str) -> Checkpoint:
        checkpoint = open_checkpoint(self._store.key, self._store.origin, note)
        if checkpoint is None:
            raise CosignatureError(f"not a checkpoint of this log ({self._store.origin}) with its signature")
        problem = self._contradiction(checkpoint)
        if problem:
            raise CosignatureError(f"the checkpoint states a tree of {checkpoint.tree_size} records that {problem}")
        return checkpoint

    def _contradiction(self, checkpoint: Checkpoint) -> str | None:
        try:
            root = self._store.prove_consistency(checkpoint.tree_size, checkpoint.tree_size)["root_hash"]
        except TreeError as exc:
            return f"this database does not hold ({exc})"
        if base64.b64decode(root).hex() != checkpoint.hash:
            return "this database does not hold: its root differs"
        return None

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            note = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            return {"witness": path.stem, "tree_size": None, "problem": f"is unreadable ({path}: {exc})"}
        checkpoint = open_checkpoint(self._store.key, self._store.origin, note)
        signed = cosignatures(note, self._cosigners)
        witness = next((c for c in signed if self._path(c.witness, c.key_id) == path), None)
        if checkpoint is None or witness is None:
            return {"witness": path.stem, "tree_size": None, "problem": f"is unreadable ({path} was altered)"}
        return {
            "witness": witness.witness,
            "tree_size": checkpoint.tree_size,
            "root_hash": base64.b64encode(bytes.fromhex(checkpoint.hash)).decode(),
            "cosigned_at": datetime.fromtimestamp(witness.timestamp, UTC).isoformat(),
            "problem": self._contradiction(checkpoint),
            "note": note,
        }

    def _path(self, witness: str, key_id: str) -> Path:
        """One file per witness key (a rotated key starts a file of its own; the old one is no longer read)."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", witness)
        digest = hashlib.sha256(witness.encode()).hexdigest()[:8]
        return self._folder / f"{safe}-{digest}-{key_id}.note"

    def contradiction(self, note: str) -> str | None:
        """For an outside auditor holding a witness's own copy: None when ``note`` is this log's checkpoint and
        the database holds the tree it states, else why not (no trust in the node's copies needed)."""
        checkpoint = open_checkpoint(self._store.key, self._store.origin, note)
        if checkpoint is None:
            return f"it is not a checkpoint of this log ({self._store.origin}) with its signature"
        problem = self._contradiction(checkpoint)
        return f"its tree of {checkpoint.tree_size} records {problem}" if problem else None


def as_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2)

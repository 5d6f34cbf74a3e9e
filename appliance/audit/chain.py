"""Canonical bytes and hashes of audit records, and checkpoints as Ed25519-signed notes.

A checkpoint is a signed note (the format of Go's sumdb/transparency logs)::

    <origin>
    <tree size>
    <base64 head hash>
    <timestamp, RFC 3339 UTC>

    — <key name> <base64(4-byte key id || Ed25519 signature of the text above)>
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.lib.secret_files import write_secret
from appliance.lib.times import as_utc

GENESIS = "0" * 64
ORIGIN = "appliance/audit"
_encoder = msgspec.json.Encoder(order="sorted")

FIELDS = (
    "seq",
    "ts",
    "node",
    "component",
    "event_type",
    "outcome",
    "subject",
    "subject_kind",
    "tenant_id",
    "object_type",
    "object_id",
    "source_ip",
    "user_agent",
    "request_id",
    "detail",
    "prev_hash",
)


def ts_text(moment: datetime | str) -> str:
    if isinstance(moment, str):  # already canonical text
        return moment
    return as_utc(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(values: dict[str, Any]) -> bytes:
    """The record's canonical bytes: its fields in a fixed order, as compact JSON (keys of detail sorted)."""
    return _encoder.encode([ts_text(values[f]) if f == "ts" else values[f] for f in FIELDS])


def record_hash(values: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(values)).hexdigest()


@dataclass(frozen=True)
class NoteKey:
    name: str
    private: Ed25519PrivateKey | None
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(self.name.encode() + b"\n\x01" + raw).digest()[:4]

    @classmethod
    def load_or_create(cls, path: Path, name: str) -> NoteKey:
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            try:
                write_secret(path, pem)
            except FileExistsError:
                pass
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (mode 0600)")
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 key")
        return cls(name, private, private.public_key())

    def public_pem(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_checkpoint(key: NoteKey, tree_size: int, head_hash: str, moment: datetime) -> str:
    assert key.private is not None
    text = f"{ORIGIN}\n{tree_size}\n{base64.b64encode(bytes.fromhex(head_hash)).decode()}\n{ts_text(moment)}\n"
    signature = key.private.sign(text.encode())
    return f"{text}\n\u2014 {key.name} {base64.b64encode(key.key_id + signature).decode()}\n"


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    head_hash: str
    timestamp: str


def open_checkpoint(key: NoteKey, note: str) -> Checkpoint | None:
    """The checkpoint a note states, if its signature by ``key`` verifies; otherwise None."""
    text, sep, signatures = note.partition("\n\n")
    if not sep:
        return None
    text += "\n"
    for line in signatures.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "\u2014" or parts[1] != key.name:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            continue
        if blob[:4] != key.key_id:
            continue
        try:
            key.public.verify(blob[4:], text.encode())
        except InvalidSignature:
            return None
        lines = text.splitlines()
        if len(lines) != 4 or lines[0] != ORIGIN:
            return None
        try:
            return Checkpoint(int(lines[1]), base64.b64decode(lines[2]).hex(), lines[3])
        except ValueError:
            return None
    return None

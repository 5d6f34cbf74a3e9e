"""Canonical bytes and hashes of audit records, and checkpoints as Ed25519-signed notes.

A record is a leaf of the log's RFC 6962 Merkle tree: ``SHA-256(0x00 || JCS(record))``, the record being the JSON
object of its fields (:data:`FIELDS`: every column but ``hash``, ``ts`` as text) canonicalized by RFC 8785. Each
record also carries ``prev_hash``, the ``hash`` of the record before it (a linear chain: :func:`record_hash`).

A checkpoint is a C2SP tlog-checkpoint, a C2SP signed note with an Ed25519 signature::

    <origin, per node: "<node>/audit" unless set>
    <tree size>
    <base64 Merkle root>

    — <key name, the origin> <base64(4-byte key id || Ed25519 signature of the text above)>

Checkpoints signed before the tree existed (origin ``appliance/audit``) stated the chain's head hash and a
timestamp instead of a root: they are still verified as such (:func:`open_legacy_checkpoint`).
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

from appliance.audit.jcs import canonicalize
from appliance.lib.secret_files import write_secret
from appliance.lib.times import as_utc

GENESIS = "0" * 64
LEGACY_ORIGIN = "appliance/audit"
ED25519 = b"\x01"  # the signed-note signature type
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
    """The chain's link: what the next record's ``prev_hash`` holds."""
    return hashlib.sha256(canonical(values)).hexdigest()


def leaf_data(values: dict[str, Any]) -> bytes:
    """The record's bytes in the Merkle tree: RFC 8785 JSON of its fields (``hash`` left out)."""
    return canonicalize({f: ts_text(values[f]) if f == "ts" else values[f] for f in FIELDS})


@dataclass(frozen=True)
class NoteKey:
    name: str
    private: Ed25519PrivateKey | None
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return hashlib.sha256(self.name.encode() + b"\n" + ED25519 + raw).digest()[:4]

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

    def vkey(self) -> str:
        """The C2SP signed-note verifier key: ``<name>+<hex key id>+<base64(0x01 || public key)>``."""
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        blob = base64.b64encode(ED25519 + raw).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    def renamed(self, name: str) -> NoteKey:
        return NoteKey(name, self.private, self.public)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteKey:
        name, _, rest = vkey.partition("+")
        key_id, _, blob = rest.partition("+")
        raw = base64.b64decode(blob, validate=True)
        if not name or len(raw) != 33 or raw[0] != 1:
            raise ValueError("not an Ed25519 verifier key")
        key = cls(name, None, Ed25519PublicKey.from_public_bytes(raw[1:]))
        if key.key_id.hex() != key_id:
            raise ValueError("the verifier key's id does not match its name and key")
        return key


def check_name(name: str) -> str:
    """A key name or origin as the formats allow: non-empty, printable, no spaces and no plus sign."""
    if not name or any(ch.isspace() or ch == "+" or not ch.isprintable() for ch in name):
        raise ValueError(f"{name!r} cannot name a log: no spaces and no '+'")
    return name


def sign_note(key: NoteKey, text: str) -> str:
    """A signed note of ``text`` (which ends with a newline) with one Ed25519 signature."""
    assert key.private is not None and text.endswith("\n")
    signature = key.private.sign(text.encode())
    return f"{text}\n\u2014 {key.name} {base64.b64encode(key.key_id + signature).decode()}\n"


def open_note(key: NoteKey, note: str) -> str | None:
    """The text of ``note`` if it carries a signature by ``key`` that verifies; otherwise None (signature lines
    of other keys, such as a witness's cosignature, are passed over)."""
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
        return text
    return None


@dataclass(frozen=True)
class Checkpoint:
    tree_size: int
    hash: str  # hex: the Merkle root (or, in a legacy checkpoint, the chain's head hash)
    timestamp: str | None = None


def checkpoint_text(origin: str, tree_size: int, root: bytes) -> str:
    return f"{origin}\n{tree_size}\n{base64.b64encode(root).decode()}\n"


def sign_checkpoint(key: NoteKey, origin: str, tree_size: int, root: bytes) -> str:
    return sign_note(key, checkpoint_text(origin, tree_size, root))


def open_checkpoint(key: NoteKey, origin: str, note: str) -> Checkpoint | None:
    """The tree head a checkpoint states, if it is of ``origin`` and its signature by ``key`` verifies."""
    text = open_note(key, note)
    if text is None:
        return None
    lines = text.splitlines()
    if len(lines) < 3 or lines[0] != origin or not lines[1].isdigit() or (lines[1] != "0" and lines[1][0] == "0"):
        return None
    try:
        root = base64.b64decode(lines[2], validate=True)
    except ValueError:
        return None
    return Checkpoint(int(lines[1]), root.hex()) if len(root) == 32 else None


def open_legacy_checkpoint(key: NoteKey, note: str) -> Checkpoint | None:
    """A checkpoint signed before the Merkle tree: origin ``appliance/audit``, the chain's head hash, a time."""
    text = open_note(key, note)
    if text is None:
        return None
    lines = text.splitlines()
    if len(lines) != 4 or lines[0] != LEGACY_ORIGIN:
        return None
    try:
        return Checkpoint(int(lines[1]), base64.b64decode(lines[2]).hex(), lines[3])
    except ValueError:
        return None


def sign_legacy_checkpoint(key: NoteKey, tree_size: int, head_hash: str, moment: datetime) -> str:
    """What the appliance signed before the tree (kept to test that such checkpoints still verify)."""
    head = base64.b64encode(bytes.fromhex(head_hash)).decode()
    return sign_note(key, f"{LEGACY_ORIGIN}\n{tree_size}\n{head}\n{ts_text(moment)}\n")

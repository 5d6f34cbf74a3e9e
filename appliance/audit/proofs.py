"""Checking a proof the way an outside auditor does: from the proof's JSON and the log's verifier key alone (no
database, no trust in the appliance). The same checks can be made with any RFC 6962, RFC 8785 and C2SP
signed-note implementation; this one is the appliance's own, for the auditor who has the appliance's CLI."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from appliance.audit.chain import NoteKey, leaf_data, open_checkpoint
from appliance.audit.merkle import ProofError, leaf_hash, verify_consistency, verify_inclusion


def check_proof(proof: dict[str, Any], vkey: str, old_checkpoint: str | None = None) -> str | None:
    """Why ``proof`` (from ``appliance audit prove``) does not hold, or None if it does: its checkpoint is
    signed by ``vkey`` (whose name is the log's origin), the proof leads to that checkpoint's root and, for an
    inclusion proof, the record it carries hashes to the proven leaf. A consistency proof's old root is checked
    against ``old_checkpoint`` (a checkpoint the auditor kept) when given."""
    try:
        key = NoteKey.from_vkey(vkey)
    except (ValueError, binascii.Error) as exc:
        return f"the verifier key is not usable: {exc}"
    note = proof.get("checkpoint")
    if not isinstance(note, str):
        return "the proof is not made against a signed checkpoint (give a checkpointed --size)"
    checkpoint = open_checkpoint(key, key.name, note)
    if checkpoint is None:
        return "the checkpoint is not signed by this key for this log"
    if proof.get("tree_size") != checkpoint.tree_size:
        return f"the proof is for {proof.get('tree_size')} records, the checkpoint for {checkpoint.tree_size}"
    root = bytes.fromhex(checkpoint.hash)
    try:
        if "inclusion_proof" in proof:
            return _inclusion(proof, checkpoint.tree_size, root)
        if "consistency_proof" in proof:
            return _consistency(proof, key, checkpoint.tree_size, root, old_checkpoint)
    except (ProofError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        return str(exc) or type(exc).__name__
    return "neither an inclusion nor a consistency proof"


def _inclusion(proof: dict[str, Any], size: int, root: bytes) -> str | None:
    leaf = base64.b64decode(proof["leaf_hash"], validate=True)
    record = proof.get("record")
    if record is not None and leaf_hash(leaf_data(record)) != leaf:
        return "the record does not hash to the proven leaf (SHA-256(0x00 || RFC 8785 JSON of the record))"
    path = [base64.b64decode(h, validate=True) for h in proof["inclusion_proof"]]
    verify_inclusion(int(proof["seq"]) - 1, size, leaf, path, root)
    return None


def _consistency(proof: dict[str, Any], key: NoteKey, size: int, root: bytes, old_checkpoint: str | None) -> str | None:
    old, old_root = int(proof["old_size"]), base64.b64decode(proof["old_root_hash"], validate=True)
    if old_checkpoint is not None:
        kept = open_checkpoint(key, key.name, old_checkpoint)
        if kept is None:
            return "the old checkpoint is not signed by this key for this log"
        if (kept.tree_size, kept.hash) != (old, old_root.hex()):
            return "the old checkpoint is not the tree the proof starts from"
    path = [base64.b64decode(h, validate=True) for h in proof["consistency_proof"]]
    verify_consistency(old, size, path, old_root, root)
    return None

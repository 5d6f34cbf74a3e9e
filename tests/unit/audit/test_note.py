"""Checkpoints are C2SP signed notes: the appliance's signer and verifier agree with golang.org/x/mod's
sumdb/note vectors, and its checkpoints have the tlog-checkpoint shape."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit.chain import NoteKey, open_checkpoint, open_note, sign_checkpoint, sign_note

PETER_SKEY = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"  # from PRIVATE+KEY+PeterNeumann+c74f20a3+...
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)


def peter() -> NoteKey:
    seed = base64.b64decode(PETER_SKEY)
    assert seed[0] == 1  # Ed25519
    private = Ed25519PrivateKey.from_private_bytes(seed[1:])
    return NoteKey("PeterNeumann", private, private.public_key())


def test_signing_gives_the_reference_note_and_key() -> None:
    assert peter().vkey() == PETER_VKEY
    assert sign_note(peter(), TEXT) == f"{TEXT}\n{PETER_SIG}"


def test_reference_notes_open_with_each_of_their_keys() -> None:
    note = f"{TEXT}\n{PETER_SIG}{ENOCH_SIG}"
    assert open_note(NoteKey.from_vkey(PETER_VKEY), note) == TEXT
    assert open_note(NoteKey.from_vkey(ENOCH_VKEY), note) == TEXT
    assert open_note(NoteKey.from_vkey(ENOCH_VKEY), f"{TEXT}\n{PETER_SIG}") is None
    assert open_note(NoteKey.from_vkey(PETER_VKEY), f"{TEXT.replace('answer', 'reply')}\n{PETER_SIG}") is None


def test_a_checkpoint_is_origin_size_root_then_the_signature_of_the_origin_key() -> None:
    key = peter().renamed("audit.example.org/node-1")
    root = bytes(range(32))
    note = sign_checkpoint(key, key.name, 7, root)
    text, signature = note.split("\n\n")
    assert text.split("\n") == ["audit.example.org/node-1", "7", base64.b64encode(root).decode()]
    assert signature.startswith("\u2014 audit.example.org/node-1 ")
    verifier = NoteKey.from_vkey(key.vkey())
    opened = open_checkpoint(verifier, key.name, note)
    assert opened is not None and (opened.tree_size, opened.hash) == (7, root.hex())
    assert open_checkpoint(verifier, "another/log", note) is None
    cosigned = note + "\u2014 witness.example/w1 AAAAAAAAAA==\n"  # a witness's line is passed over
    assert open_checkpoint(verifier, key.name, cosigned) == opened

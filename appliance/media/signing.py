"""Ed25519 keys and signatures of the media manifest (PEM keys; the private key file is written 0600)."""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.lib.secret_files import write_secret


class SignatureError(Exception):
    pass


def generate(private_path: Path, public_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(private_path, private)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def sign(data: bytes, private_path: Path) -> bytes:
    key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{private_path} is not an Ed25519 private key")
    return key.sign(data)


def verify(data: bytes, signature: bytes, public_path: Path) -> None:
    try:
        key = serialization.load_pem_public_key(public_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read the public key {public_path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{public_path} is not an Ed25519 public key")
    try:
        key.verify(signature, data)
    except InvalidSignature:
        raise SignatureError("the manifest's signature does not match this public key") from None

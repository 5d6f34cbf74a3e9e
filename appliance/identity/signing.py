"""The embedded issuer's signing key: an ES256 (P-256) key made on first start, in a 0600 file."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.lib.secret_files import write_secret

ALGORITHM = "ES256"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SigningKey:
    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self.private_key = private_key
        numbers = private_key.public_key().public_numbers()
        self.public_jwk: dict[str, Any] = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        # RFC 7638 thumbprint as the key id.
        canonical = json.dumps(self.public_jwk, separators=(",", ":"), sort_keys=True).encode()
        self.kid = _b64(hashlib.sha256(canonical).digest())
        self.public_jwk.update({"kid": self.kid, "alg": ALGORITHM, "use": "sig"})

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        if not path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            try:
                write_secret(path, pem)
            except FileExistsError:
                pass  # another process made it first: use theirs
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (mode 0600)")
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return cls(loaded)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk]}

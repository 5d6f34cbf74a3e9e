"""The backup file: a plain header, then the content (a tar stream) in AES-256-GCM frames.

Layout::

    b"APPLBAK1"  u32 header length  header (JSON: format, kdf and its parameters and salt, nonce prefix,
                                            frame size, key check)
    frame 0 .. frame n      u32 ciphertext length, ciphertext (with its 16-byte tag)

The key comes from the passphrase through scrypt (64 bytes: the AES key, and a key whose HMAC in the header
tells a wrong passphrase from a damaged file). Frame ``i``'s nonce is the header's 4-byte prefix and ``i``
(8 bytes); its associated data is the header's bytes, ``i`` and a flag set only on the last frame. So any
changed byte, a frame removed, reordered or repeated, a header edited, a file cut short (no final frame) or
extended (bytes after it) fails authentication before anything is used. Frames are ``frame_size`` bytes of
content at most, so a multi-gigabyte member streams through a bounded buffer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import struct
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

MAGIC = b"APPLBAK1"
FORMAT = 1
FRAME_SIZE = 1 << 20
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1  # 128 MiB of memory, about half a second
_MAX_HEADER = 64 * 1024
_MAX_N, _MAX_R, _MAX_P = 1 << 20, 32, 16  # a header asking for more is refused, not obeyed
_LENGTH = struct.Struct(">I")
_TAG = 16


class ArchiveError(Exception):
    """The backup file cannot be read: wrong passphrase, damaged, cut short, not a backup."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    material = Scrypt(salt=salt, length=64, n=n, r=r, p=p).derive(passphrase)
    return material[:32], material[32:]


def _key_check(check_key: bytes, salt: bytes) -> str:
    return hmac.new(check_key, b"appliance-backup-key-check\x00" + salt, hashlib.sha256).hexdigest()


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


class EncryptingWriter(io.RawIOBase):
    """A write-only stream: bytes written are encrypted in frames onto ``sink``; :meth:`finish` writes the last
    frame (call it once everything is written; a writer closed without it leaves a file restore refuses)."""

    def __init__(self, sink: BinaryIO, passphrase: bytes, *, frame_size: int = FRAME_SIZE) -> None:
        super().__init__()
        salt = os.urandom(16)
        aes_key, check_key = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
        self._prefix = os.urandom(4)
        header = {
            "format": FORMAT,
            "cipher": "AES-256-GCM",
            "kdf": {"name": "scrypt", "salt": _b64(salt), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P},
            "nonce_prefix": _b64(self._prefix),
            "frame_size": frame_size,
            "key_check": _key_check(check_key, salt),
        }
        self._header = json.dumps(header, sort_keys=True).encode()
        self._aes = AESGCM(aes_key)
        self._sink = sink
        self._frame_size = frame_size
        self._buffer = bytearray()
        self._index = 0
        self.finished = False
        sink.write(MAGIC + _LENGTH.pack(len(self._header)) + self._header)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.finished:
            raise ValueError("the backup is finished")
        view = memoryview(data).cast("B")
        self._buffer += view
        while len(self._buffer) > self._frame_size:
            self._emit(bytes(self._buffer[: self._frame_size]), final=False)
            del self._buffer[: self._frame_size]
        return len(view)

    def _emit(self, plain: bytes, *, final: bool) -> None:
        nonce = self._prefix + struct.pack(">Q", self._index)
        sealed = self._aes.encrypt(nonce, plain, _aad(self._header, self._index, final))
        self._sink.write(_LENGTH.pack(len(sealed)) + sealed)
        self._index += 1

    def finish(self) -> None:
        self._emit(bytes(self._buffer), final=True)
        self._buffer.clear()
        self.finished = True


class DecryptingReader(io.RawIOBase):
    """A read-only stream of the content of a backup file; raises :class:`ArchiveError` at the first frame that
    does not authenticate, and at the end when the final frame is missing or followed by anything."""

    def __init__(self, source: BinaryIO, passphrase: bytes) -> None:
        super().__init__()
        self._source = source
        if source.read(len(MAGIC)) != MAGIC:
            raise ArchiveError("not an appliance backup (its first bytes are not the backup format's)")
        raw_length = source.read(_LENGTH.size)
        if len(raw_length) != _LENGTH.size or not 0 < _LENGTH.unpack(raw_length)[0] <= _MAX_HEADER:
            raise ArchiveError("the backup's header is damaged")
        self._header = source.read(_LENGTH.unpack(raw_length)[0])
        try:
            header = json.loads(self._header)
            kdf = header["kdf"]
            salt = base64.b64decode(kdf["salt"])
            n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
            self._prefix = base64.b64decode(header["nonce_prefix"])
            self._frame_size = int(header["frame_size"])
            key_check = str(header["key_check"])
            format_ = header["format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArchiveError("the backup's header is damaged") from exc
        if format_ != FORMAT:
            raise ArchiveError(f"backup format {format_} is not one this appliance reads (it reads {FORMAT})")
        if kdf.get("name") != "scrypt" or not (1 < n <= _MAX_N and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
            raise ArchiveError("the backup's header asks for key derivation parameters this appliance refuses")
        if len(self._prefix) != 4 or not 0 < self._frame_size <= 64 * FRAME_SIZE:
            raise ArchiveError("the backup's header is damaged")
        aes_key, check_key = _derive(passphrase, salt, n, r, p)
        if not hmac.compare_digest(_key_check(check_key, salt), key_check):
            raise ArchiveError("wrong passphrase (or the backup's header is damaged): nothing was decrypted")
        self._aes = AESGCM(aes_key)
        self._index = 0
        self._plain = b""
        self._offset = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _next_frame(self) -> None:
        raw_length = self._source.read(_LENGTH.size)
        if not raw_length:
            raise ArchiveError(f"the backup is cut short: it ends after frame {self._index - 1} without its last one")
        if len(raw_length) != _LENGTH.size:
            raise ArchiveError(f"the backup is cut short inside frame {self._index}")
        length = _LENGTH.unpack(raw_length)[0]
        if not _TAG <= length <= self._frame_size + _TAG:
            raise ArchiveError(f"frame {self._index} of the backup is damaged (impossible length)")
        sealed = self._source.read(length)
        if len(sealed) != length:
            raise ArchiveError(f"the backup is cut short inside frame {self._index}")
        nonce = self._prefix + struct.pack(">Q", self._index)
        for final in (False, True):
            try:
                plain = self._aes.decrypt(nonce, sealed, _aad(self._header, self._index, final))
            except InvalidTag:
                continue
            self._index += 1
            self._plain, self._offset, self._done = plain, 0, final
            if final and self._source.read(1):
                raise ArchiveError("the backup has bytes after its last frame: it was altered")
            return
        raise ArchiveError(f"frame {self._index} of the backup fails authentication: the file is damaged or altered")

    def readinto(self, target: Any) -> int:
        view = memoryview(target).cast("B")
        while self._offset >= len(self._plain):
            if self._done:
                return 0
            self._next_frame()
        count = min(len(view), len(self._plain) - self._offset)
        view[:count] = self._plain[self._offset : self._offset + count]
        self._offset += count
        return count

    def drain(self) -> None:
        """Read and authenticate to the end (the content may stop before the last frame does)."""
        while not self._done or self._offset < len(self._plain):
            self._offset = len(self._plain)
            if not self._done:
                self._next_frame()

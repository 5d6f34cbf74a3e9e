"""The encrypted container on its own: frames, their order, the header's limits, bounded memory."""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest

from appliance.backup.archive import ArchiveError, DecryptingReader, EncryptingWriter
from appliance.backup.create import create_backup
from appliance.backup.layout import Layout
from appliance.backup.restore import restore_backup
from appliance.lib.progress import Progress
from appliance.settings import Settings
from tests.unit.backup.conftest import PASSPHRASE, populate


def seal(content: bytes, frame_size: int = 1000) -> bytes:
    sink = io.BytesIO()
    writer = EncryptingWriter(sink, PASSPHRASE, frame_size=frame_size)
    for start in range(0, len(content), 777):
        writer.write(content[start : start + 777])
    writer.finish()
    return sink.getvalue()


def frames(sealed: bytes) -> tuple[bytes, list[bytes]]:
    offset = 12 + struct.unpack(">I", sealed[8:12])[0]
    head, found = sealed[:offset], []
    while offset < len(sealed):
        end = offset + 4 + struct.unpack(">I", sealed[offset : offset + 4])[0]
        found.append(sealed[offset:end])
        offset = end
    return head, found


def test_content_comes_back_through_many_frames() -> None:
    content = os.urandom(10_500)
    sealed = seal(content)
    assert len(frames(sealed)[1]) == 11
    assert DecryptingReader(io.BytesIO(sealed), PASSPHRASE).read() == content
    assert DecryptingReader(io.BytesIO(seal(b"")), PASSPHRASE).read() == b""


def test_frames_swapped_or_replayed_do_not_authenticate() -> None:
    head, found = frames(seal(os.urandom(5000)))
    for altered in ([found[0], found[2], found[1], *found[3:]], [found[0], found[0], *found[1:]]):
        with pytest.raises(ArchiveError, match="frame 1 of the backup fails authentication"):
            DecryptingReader(io.BytesIO(head + b"".join(altered)), PASSPHRASE).read()


def test_a_header_asking_for_too_much_work_is_refused_and_a_stranger_file_is_named() -> None:
    head, found = frames(seal(b"x"))
    header = json.loads(head[12:])
    header["kdf"]["n"] = 1 << 30
    raw = json.dumps(header).encode()
    with pytest.raises(ArchiveError, match="key derivation parameters this appliance refuses"):
        DecryptingReader(io.BytesIO(b"APPLBAK1" + struct.pack(">I", len(raw)) + raw + found[0]), PASSPHRASE)
    with pytest.raises(ArchiveError, match="not an appliance backup"):
        DecryptingReader(io.BytesIO(b"PK\x03\x04 a zip file"), PASSPHRASE)


def test_a_large_member_streams_through_bounded_memory(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "node")
    populate(settings)
    big = settings.data_dir / "qdrant" / "collection" / "segment.bin"
    big.parent.mkdir(parents=True)
    with big.open("wb") as handle:
        for _ in range(48):
            handle.write(os.urandom(1 << 20))
    quiet = Progress(enabled=False)
    tracemalloc.start()
    try:
        create_backup(Layout.of(settings), tmp_path / "big.backup", PASSPHRASE, quiet)
        _size, backup_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        target = Settings(data_dir=tmp_path / "restored")
        restore_backup(Layout.of(target), tmp_path / "big.backup", PASSPHRASE, quiet)
        _size, restore_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (target.data_dir / "qdrant" / "collection" / "segment.bin").read_bytes() == big.read_bytes()
    assert backup_peak < 16 << 20 and restore_peak < 16 << 20, (backup_peak, restore_peak)

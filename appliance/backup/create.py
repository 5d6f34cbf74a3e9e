"""``appliance backup``: collect the node's state into one encrypted file.

What goes in, in this order (the order matters while the gateway runs): the secrets, the audit files outside the
database, the configuration, the database, the vector store. The audit folder's latest checkpoint is read before
the database, so the restored chain never looks rolled back behind it; the database before the vectors, so a
restored catalog never names vectors that are not there (extra vectors of a newer document are harmless).

Inside, a tar stream: ``secrets/``, ``audit/``, ``config/``, ``database/``, ``qdrant/`` and, last,
``manifest.json`` (every member's size, sha256 and mode, the appliance version, the schema revision).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from appliance import __version__
from appliance.backup import database
from appliance.backup.archive import FRAME_SIZE, EncryptingWriter
from appliance.backup.layout import Layout
from appliance.lib.errors import ServiceUnavailableError
from appliance.lib.progress import Progress, Stage
from appliance.retrieval.edge_shared import SNAPSHOT, consistent_copy

MANIFEST = "manifest.json"
SQLITE_MEMBER = "database/appliance.sqlite"
POSTGRES_MEMBER = "database/postgresql.sql"
_SMALL = 16 * 1024 * 1024  # files this small are read whole, so a file changing meanwhile cannot tear the stream
_SKIP = {".lock"}  # Qdrant local mode's lock file: the restored folder gets its own


class BackupError(Exception):
    """The backup cannot be made (the message says why); no file was written."""


@dataclass
class _Collector:
    tar: tarfile.TarFile
    scratch: Path
    members: list[dict[str, Any]] = field(default_factory=list)

    def add_dir(self, name: str, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, stat.S_IMODE(mode), int(time.time())
        self.tar.addfile(info)
        self.members.append({"name": name, "type": "dir", "mode": oct(stat.S_IMODE(mode))})

    def add_file(self, name: str, path: Path, stage: Stage, *, mode: int | None = None) -> None:
        with path.open("rb") as handle:
            status = os.fstat(handle.fileno())
            source: IO[bytes] = io.BytesIO(handle.read()) if status.st_size <= _SMALL else handle
            size = len(source.getvalue()) if isinstance(source, io.BytesIO) else status.st_size
            info = tarfile.TarInfo(name)
            info.size, info.mtime = size, int(status.st_mtime)
            info.mode = stat.S_IMODE(status.st_mode if mode is None else mode)
            hashing = _Hashing(source)
            self.tar.addfile(info, hashing)
        self.members.append(
            {"name": name, "type": "file", "size": size, "sha256": hashing.digest.hexdigest(), "mode": oct(info.mode)}
        )
        stage.add(files=1, nbytes=size)

    def add_tree(self, prefix: str, root: Path, stage: Stage, *, instead: dict[str, Path | None] | None = None) -> None:
        """A folder, files and sub-folders (symbolic links and special files are not followed nor kept); the
        SQLite files in it (Qdrant local mode's collections) are copied through SQLite's backup API. ``instead``
        maps a sub-folder of ``root`` to a consistent copy of it, stored under its name (None: left out)."""
        self.add_dir(prefix, root.stat().st_mode)
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            here = Path(folder)
            relative = here.relative_to(root)
            if here == root and instead:
                for name, copy in instead.items():
                    if name in dirs:
                        dirs.remove(name)
                        if copy is not None:
                            self.add_tree(f"{prefix}/{name}", copy, stage)
            for name in dirs:
                if not (here / name).is_symlink():
                    self.add_dir(f"{prefix}/{(relative / name).as_posix()}", (here / name).stat().st_mode)
            for name in sorted(files):
                path = here / name
                if name in _SKIP or path.is_symlink() or not path.is_file():
                    continue
                member = f"{prefix}/{(relative / name).as_posix()}"
                if database.is_sqlite_file(path):
                    copy = self.scratch / "sqlite-copy"
                    database.sqlite_snapshot(path, copy)
                    self.add_file(member, copy, stage, mode=path.stat().st_mode)
                    copy.unlink()
                else:
                    self.add_file(member, path, stage)


class _Hashing(io.RawIOBase):
    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.digest.update(data)
        return data


def create_backup(
    layout: Layout, out: Path, passphrase: bytes, progress: Progress, *, frame_size: int = FRAME_SIZE
) -> dict[str, Any]:
    """Write the backup to ``out`` (0600, through a temporary file renamed into place: ``out`` is either the
    complete backup or untouched). Returns the summary."""
    started = time.monotonic()
    out = out.absolute()
    if out.is_dir():
        raise BackupError(f"{out} is a folder: give the backup file's name")
    if not out.parent.is_dir():
        raise BackupError(f"the folder {out.parent} does not exist")
    descriptor, partial_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    partial = Path(partial_name)
    try:
        with os.fdopen(descriptor, "wb") as sink, tempfile.TemporaryDirectory(dir=out.parent) as scratch_name:
            os.fchmod(sink.fileno(), 0o600)
            manifest = _write(layout, sink, Path(scratch_name), passphrase, progress, frame_size)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(partial, out)
        _fsync_dir(out.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return {
        "file": str(out),
        "size": out.stat().st_size,
        "files": sum(1 for m in manifest["members"] if m["type"] == "file"),
        "bytes": sum(m.get("size", 0) for m in manifest["members"]),
        "appliance_version": manifest["appliance_version"],
        "schema_revision": manifest["schema_revision"],
        "database": manifest["database"]["kind"],
        "vector_store": manifest["vector_store"],
        "elapsed_s": round(time.monotonic() - started, 2),
    }


def _write(
    layout: Layout, sink: BinaryIO, scratch: Path, passphrase: bytes, progress: Progress, frame_size: int
) -> dict[str, Any]:
    with progress.stage("deriving the key (scrypt)"):
        writer = EncryptingWriter(sink, passphrase, frame_size=frame_size)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        collect = _Collector(tar, scratch)
        parts: dict[str, Any] = {}
        with progress.stage("secrets") as stage:
            if layout.secrets_dir.is_dir():
                collect.add_tree("secrets", layout.secrets_dir, stage)
                parts["secrets"] = str(layout.secrets_dir)
        with progress.stage("audit files") as stage:
            if layout.audit_dir.is_dir():
                collect.add_tree("audit", layout.audit_dir, stage)
                parts["audit"] = str(layout.audit_dir)
        with progress.stage("configuration") as stage:
            configs = layout.config_files()
            if configs:
                collect.add_dir("config", 0o755)
                for path in configs:
                    collect.add_file(f"config/{path.name}", path, stage)
                parts["config"] = str(configs[0].parent)
        with progress.stage(f"database ({layout.database_kind})") as stage:
            db, revision = _database(layout, collect, scratch, stage)
        with progress.stage("vector store") as stage:
            vectors = _vectors(layout, collect, stage, progress)
            if vectors["included"]:
                parts["qdrant"] = vectors["path"]
        manifest = {
            "format": 1,
            "appliance_version": __version__,
            "schema_revision": revision,
            "created_at": datetime.now(UTC).isoformat(),
            "node": layout.node,
            "database": db,
            "vector_store": vectors,
            "parts": parts,
            "not_included": "logs, run state, prepared models (they come from the install media), caches",
            "members": collect.members,
        }
        data = json.dumps(manifest, indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    with progress.stage("sealing the file"):
        writer.finish()
    return manifest


def _database(layout: Layout, collect: _Collector, scratch: Path, stage: Stage) -> tuple[dict[str, Any], str | None]:
    if layout.database_kind == "sqlite":
        source = layout.sqlite_path
        if not source.is_file():
            raise BackupError(f"the database {source} does not exist: nothing to back up")
        copy = scratch / "appliance.sqlite"
        database.sqlite_snapshot(source, copy)
        revision = database.sqlite_revision(copy)
        collect.add_dir("database", 0o700)
        collect.add_file(SQLITE_MEMBER, copy, stage, mode=source.stat().st_mode)
        copy.unlink()
        return {"kind": "sqlite", "member": SQLITE_MEMBER, "source": str(source)}, revision
    if layout.database_kind == "postgresql":
        dump = scratch / "postgresql.sql"
        try:
            revision = database.postgres_dump(layout.database_url, dump, layout.database_user)
        except database.DatabaseError as exc:
            raise BackupError(str(exc)) from exc
        collect.add_dir("database", 0o700)
        collect.add_file(POSTGRES_MEMBER, dump, stage, mode=0o600)
        dump.unlink()
        where = f"{layout.database_url.host or ''}/{layout.database_url.database}"
        return {"kind": "postgresql", "member": POSTGRES_MEMBER, "source": where}, revision
    raise BackupError(f"a {layout.database_kind} database cannot be backed up (SQLite and PostgreSQL can)")


def _vectors(layout: Layout, collect: _Collector, stage: Stage, progress: Progress) -> dict[str, Any]:
    if layout.qdrant_path is None:
        note = (
            f"the vectors live in a Qdrant server ({layout.qdrant_url}), which this backup does not include: "
            "back it up with Qdrant's own snapshots"
        )
        progress.line(f"  NOTE: {note}")
        return {"kind": "server", "url": layout.qdrant_url, "included": False, "note": note}
    if not layout.qdrant_path.is_dir():
        return {"kind": "local", "path": str(layout.qdrant_path), "included": False, "note": "no vector store yet"}
    if not (layout.qdrant_path / "edge").is_dir():
        collect.add_tree("qdrant", layout.qdrant_path, stage)
        return {"kind": "local", "path": str(layout.qdrant_path), "included": True}
    # Qdrant Edge's shards are copied each whole, between two writes of a running gateway (after the database:
    # every document the database calls ready has all its points in the copy)
    # The copy is made beside the store, not in this backup's scratch folder: the owner runs as the appliance's
    # user, who may not write where root (on a node) writes the backup.
    copy = layout.qdrant_path / SNAPSHOT
    try:
        made_by = consistent_copy(layout.qdrant_path, copy)
        collect.add_tree("qdrant", layout.qdrant_path, stage, instead={"edge": copy, SNAPSHOT: None})
    except ServiceUnavailableError as exc:
        raise BackupError(str(exc)) from exc
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return {"kind": "local", "path": str(layout.qdrant_path), "included": True, "edge_copy": made_by}


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)

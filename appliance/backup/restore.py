"""``appliance restore``: put a backup back, on this node or a freshly installed one, with the appliance stopped.

1. **Verify** before touching anything: the passphrase, every frame, every member against the manifest's sha256
   and size, the schema revision (a newer one than this appliance knows is refused), the database kind; the
   content is unpacked into a staging folder on the data directory's file system meanwhile.
2. **Swap**: each part (secrets, audit files, the SQLite database with its WAL files, the vector store, and with
   ``--restore-config`` the configuration) is renamed aside and the restored one renamed into place; a
   PostgreSQL database is replaced last, in one transaction. If anything fails, every part already swapped is
   put back as it was, and the error says so.
3. The old copies are deleted once everything is in place.

The destinations are this node's (its settings), not the backed-up node's. An older schema is migrated when the
appliance next starts (it migrates at every start, under a lock), so restore and start share one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from appliance.backup import database
from appliance.backup.archive import ArchiveError, DecryptingReader
from appliance.backup.create import MANIFEST, POSTGRES_MEMBER, SQLITE_MEMBER
from appliance.backup.layout import NODE_CONFIG_DIR, Layout
from appliance.lib.progress import Progress

_PARTS = ("secrets", "audit", "config", "database", "qdrant")
_CHUNK = 1 << 20


class RestoreError(Exception):
    """The backup was not restored (the message says why, and whether anything changed)."""


@dataclass
class _Swap:
    target: Path
    staged: Path | None  # None: the target is only moved aside (a SQLite WAL file)
    aside: Path | None = None
    placed: bool = False
    copied: bool = False  # staged is a copy made next to the target (another file system)


def restore_backup(
    layout: Layout,
    backup: Path,
    passphrase: bytes,
    progress: Progress,
    *,
    restore_config: bool = False,
    verify_only: bool = False,
) -> dict[str, Any]:
    started = time.monotonic()
    created = not layout.data_dir.exists()
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    staging = layout.data_dir / f".restore-{secrets.token_hex(4)}"
    finished = False
    try:
        staging.mkdir(mode=0o700)
        manifest = _unpack(backup, passphrase, staging, progress)
        _check_compatible(layout, manifest)
        if verify_only:
            return _summary(backup, manifest, [], [], started, verified_only=True)
        plan, skipped = _plan(layout, manifest, staging, restore_config)
        owner = _owner(layout)
        _own(owner, staging)
        with progress.stage("putting the restored files in place"):
            swaps = _swap_all(plan, owner)
        try:
            if manifest["database"]["kind"] == "postgresql":
                with progress.stage("restoring the PostgreSQL database (one transaction)"):
                    database.postgres_restore(layout.database_url, staging / POSTGRES_MEMBER, layout.database_user)
        except database.DatabaseError as exc:
            _roll_back(swaps)
            raise RestoreError(f"{exc}; the files were put back as they were: nothing changed") from exc
        _discard_asides(swaps)
        restored = [{"part": name, "to": str(swap.target)} for name, swap in plan if swap.staged is not None]
        removed = [
            {"part": name, "path": str(swap.target)}
            for name, swap in plan
            if swap.staged is None and swap.aside is not None and name != "database"
        ]
        if manifest["database"]["kind"] == "postgresql":
            restored.append({"part": "database", "to": layout.database_url.render_as_string(hide_password=True)})
        finished = True
        return _summary(backup, manifest, restored, skipped, started, verified_only=False) | {"removed": removed}
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not finished:
            shutil.rmtree(layout.data_dir, ignore_errors=True)  # made only to stage into: nothing left behind


# -- verify ---------------------------------------------------------------------------------------------------


def _unpack(backup: Path, passphrase: bytes, staging: Path, progress: Progress) -> dict[str, Any]:
    seen: dict[str, tuple[str, int]] = {}
    manifest: dict[str, Any] | None = None
    try:
        source = backup.open("rb")
    except OSError as exc:
        raise RestoreError(f"cannot read {backup}: {exc.strerror}") from exc
    with source:
        try:
            with progress.stage("deriving the key (scrypt)"):
                reader = DecryptingReader(source, passphrase)
        except ArchiveError as exc:
            raise RestoreError(f"{exc}; nothing was restored") from exc
        with progress.stage("decrypting and checking every member") as stage:
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tar:
                    for member in tar:
                        if manifest is not None:
                            raise RestoreError("the backup has members after its manifest")
                        extracted = tar.extractfile(member) if member.isfile() else None
                        if member.name == MANIFEST and extracted is not None:
                            manifest = json.loads(extracted.read())
                            continue
                        target = _member_path(staging, member)
                        if member.isdir():
                            target.mkdir(mode=0o700, parents=True, exist_ok=True)
                            continue
                        assert extracted is not None
                        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        seen[member.name] = _write_member(extracted, target)
                        stage.add(files=1, nbytes=seen[member.name][1])
                reader.drain()
            except ArchiveError as exc:
                raise RestoreError(f"{exc}; nothing was restored") from exc
            except tarfile.TarError as exc:
                raise RestoreError(f"the backup's content is not readable ({exc}): nothing was restored") from exc
    if manifest is None:
        raise RestoreError("the backup has no manifest: it is incomplete; nothing was restored")
    _check_members(manifest, seen, staging)
    return manifest


def _member_path(staging: Path, member: tarfile.TarInfo) -> Path:
    name = PurePosixPath(member.name)
    if (
        name.is_absolute()
        or ".." in name.parts
        or not name.parts
        or name.parts[0] not in _PARTS
        or not (member.isfile() or member.isdir())
    ):
        raise RestoreError(f"the backup holds a member it may not: {member.name!r}; nothing was restored")
    return staging.joinpath(*name.parts)


def _write_member(source: Any, target: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    return digest.hexdigest(), size


def _check_members(manifest: dict[str, Any], seen: dict[str, tuple[str, int]], staging: Path) -> None:
    listed = {m["name"]: m for m in manifest.get("members", [])}
    for name in seen:
        if name not in listed or listed[name]["type"] != "file":
            raise RestoreError(f"the backup holds {name}, which its manifest does not list; nothing was restored")
    for name, member in listed.items():
        if member["type"] == "dir":
            folder = _member_path(staging, _dir_info(name))
            if not folder.is_dir():
                raise RestoreError(
                    f"the backup lacks the folder {name}, which its manifest lists; nothing was restored"
                )
            folder.chmod(int(member["mode"], 8) & 0o7777)
            continue
        if name not in seen:
            raise RestoreError(f"the backup lacks {name}, which its manifest lists; nothing was restored")
        if seen[name] != (member["sha256"], member["size"]):
            raise RestoreError(f"{name} in the backup does not match its manifest's sha256; nothing was restored")
        (staging / name).chmod(int(member["mode"], 8) & 0o7777)


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def _check_compatible(layout: Layout, manifest: dict[str, Any]) -> None:
    head, known = database.known_revisions()
    revision = manifest.get("schema_revision")
    if revision is not None and revision not in known:
        raise RestoreError(
            f"the backup's schema revision {revision} is newer than this appliance knows (newest {head}); it was "
            f"made by appliance {manifest.get('appliance_version')}: install that version or newer, then restore. "
            "Nothing was restored"
        )
    kind = manifest["database"]["kind"]
    if kind != layout.database_kind:
        raise RestoreError(
            f"the backup holds a {kind} database and this node is configured for {layout.database_kind}; "
            "configure the same kind (database.url) and restore again. Nothing was restored"
        )


# -- swap -----------------------------------------------------------------------------------------------------


def _plan(
    layout: Layout, manifest: dict[str, Any], staging: Path, restore_config: bool
) -> tuple[list[tuple[str, _Swap]], list[dict[str, str]]]:
    """What replaces what, in order; and what is left out, with why."""
    plan: list[tuple[str, _Swap]] = []
    skipped: list[dict[str, str]] = []
    parts = manifest.get("parts", {})
    # The node's state becomes the backup's: a part the backup does not have is moved away too (a fresh
    # node's own audit checkpoint would otherwise contradict the restored chain).
    plan.append(("secrets", _Swap(layout.secrets_dir, staging / "secrets" if "secrets" in parts else None)))
    plan.append(("audit", _Swap(layout.audit_dir, staging / "audit" if "audit" in parts else None)))
    if manifest["database"]["kind"] == "sqlite":
        target = layout.sqlite_path
        plan.append(("database", _Swap(target, staging / SQLITE_MEMBER)))
        for suffix in ("-wal", "-shm", "-journal"):
            plan.append(("database", _Swap(target.with_name(target.name + suffix), None)))
    vectors = manifest["vector_store"]
    if layout.qdrant_path is None:
        if "qdrant" in parts:
            why = "this node uses a Qdrant server; the backup's local vector store was not restored"
            skipped.append({"part": "qdrant", "why": why})
    elif "qdrant" in parts:
        plan.append(("qdrant", _Swap(layout.qdrant_path, staging / "qdrant")))
    elif vectors.get("kind") == "local":
        plan.append(("qdrant", _Swap(layout.qdrant_path, None)))  # the backed-up node had no collections yet
    else:
        skipped.append({"part": "qdrant", "why": vectors.get("note", "not in the backup")})
    if "config" in parts:
        if restore_config:
            folder = layout.config_file.parent if layout.config_file is not None else NODE_CONFIG_DIR
            for path in sorted((staging / "config").iterdir()):
                plan.append(("config", _Swap(folder / path.name, path)))
        else:
            skipped.append({"part": "config", "why": "kept this node's configuration (give --restore-config)"})
    return plan, skipped


def _owner(layout: Layout) -> tuple[int, int] | None:
    """As root, the restored files belong to the data directory's owner (the appliance's user)."""
    if os.geteuid() != 0:
        return None
    status = layout.data_dir.stat()
    return status.st_uid, status.st_gid


def _own(owner: tuple[int, int] | None, root: Path) -> None:
    if owner is None:
        return
    os.chown(root, *owner, follow_symlinks=False)
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.chown(Path(folder) / name, *owner, follow_symlinks=False)


def _swap_all(plan: list[tuple[str, _Swap]], owner: tuple[int, int] | None) -> list[_Swap]:
    stamp = f"pre-restore-{secrets.token_hex(4)}"
    done: list[_Swap] = []
    try:
        for _name, swap in plan:
            done.append(swap)
            staged = swap.staged
            if staged is not None and os.stat(staged.parent).st_dev != _device_of(swap.target):
                # Another file system: copy next to the target first, so the swap itself is a rename.
                near = swap.target.parent / f".{swap.target.name}.{stamp}.new"
                swap.target.parent.mkdir(parents=True, exist_ok=True)
                swap.copied, swap.staged = True, near
                _copy(staged, near)
                _own(owner, near)
                staged = near
            if swap.target.exists() or swap.target.is_symlink():
                aside = swap.target.with_name(f".{swap.target.name}.{stamp}")
                os.rename(swap.target, aside)
                swap.aside = aside
            if staged is not None:
                swap.target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staged, swap.target)
                swap.placed = True
    except OSError as exc:
        _roll_back(done)
        raise RestoreError(
            f"restoring {swap.target} failed ({exc.strerror or exc}); everything was put back as it was"
        ) from exc
    return done


def _device_of(target: Path) -> int:
    for folder in (target.parent, *target.parent.parents):
        if folder.exists():
            return os.stat(folder).st_dev
    raise AssertionError("the root folder exists")


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, copy_function=shutil.copy2)
    else:
        shutil.copy2(source, target)


def _roll_back(done: list[_Swap]) -> None:
    problems, discards = [], []
    for swap in reversed(done):
        try:
            if swap.copied and not swap.placed and swap.staged is not None:
                _remove(swap.staged)
            if swap.placed:
                discard = swap.target.with_name(f".{swap.target.name}.undone-{secrets.token_hex(4)}")
                os.rename(swap.target, discard)
                discards.append(discard)
            if swap.aside is not None:
                os.rename(swap.aside, swap.target)
        except OSError as exc:
            problems.append(f"{swap.target} (its previous copy is {swap.aside}): {exc.strerror or exc}")
    for discard in discards:
        _remove(discard)
    if problems:
        raise RestoreError("the restore failed AND putting back the previous files failed for: " + "; ".join(problems))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _discard_asides(done: list[_Swap]) -> None:
    for swap in done:
        if swap.aside is not None:
            try:
                _remove(swap.aside)
            except OSError:
                pass  # the restore is complete; a leftover old copy is only disk space


def _summary(
    backup: Path,
    manifest: dict[str, Any],
    restored: list[dict[str, str]],
    skipped: list[dict[str, str]],
    started: float,
    *,
    verified_only: bool,
) -> dict[str, Any]:
    head, _known = database.known_revisions()
    revision = manifest.get("schema_revision")
    return {
        "file": str(backup),
        "verified": True,
        "restored": restored,
        "skipped": skipped,
        "backup": {
            "created_at": manifest["created_at"],
            "node": manifest["node"],
            "appliance_version": manifest["appliance_version"],
            "files": sum(1 for m in manifest["members"] if m["type"] == "file"),
        },
        "schema_revision": revision,
        "migrates_on_next_start": revision is not None and revision != head and not verified_only,
        "elapsed_s": round(time.monotonic() - started, 2),
    }

"""A process's write-ahead journal of the records it hands to a group-commit writer.

An answer must not be released before its records (usage row, audit record) would survive the process that
wrote them. Waiting for a database commit on every answer puts a transaction, a thread hop and the database's
write lock on the request's critical path. Instead, the writer appends each record to its journal, a file of
this process alone (one ``write`` of a few hundred bytes, from the event loop, no thread), and commits to the
database in group commits off the request's path. A record in the journal survives the process being killed
(``kill -9``, the OOM killer): the bytes are in the kernel's page cache. With ``fsync``, an answer also waits
for ``fdatasync`` (shared by every answer that arrived while the last one ran): it then survives a power cut.

Each entry carries a sequence number of its journal, never reused; the writer commits, in the same transaction
as each batch, the highest number it holds (``appliance/db/marks.py``). A journal is a series of files (parts),
each locked (``flock``) by its process for as long as it holds it: a part grown past ``ROTATE_AT`` is followed by a
new one, and removed once every entry in it is committed, so a journal stays small under any load. Parts whose
lock nobody holds were left by a dead process; the next writer of their kind that finds them (:func:`orphans`)
writes what lies past the journal's mark, then removes them. Entries are framed
(length, number, CRC-32 of them and the payload): a frame cut short by a power cut ends the journal, loudly, and
is never guessed at.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
import uuid
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec

log = logging.getLogger(__name__)
T = TypeVar("T")

_FRAME = struct.Struct(">IQI")  # payload length, entry number, CRC-32 of both and of the payload
_HEAD = struct.Struct(">IQ")


def _crc(length: int, seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_HEAD.pack(length, seq)))


SUFFIX = ".journal"
ROTATE_AT = 4 * 1024 * 1024  # bytes: a part grown past this is followed by a new one
_RECHECK_S = 0.5  # a journal the disk refused is checked for room at most this often
_ROOM = 1024 * 1024  # bytes: the room a refused journal needs before it takes entries again
_WHOLE, _CUT, _DAMAGED = "whole", "cut", "damaged"  # how reading a part ended


class _Part:
    """One file of a journal, created locked."""

    __slots__ = ("fd", "last", "path")

    def __init__(self, path: Path, *, fsync: bool) -> None:
        # Made aside, locked, then renamed into place: no writer looking for dead processes' parts takes it.
        staged = path.with_name(path.name + ".new")
        fd = os.open(staged, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(staged, path)
            if fsync:  # the part's name survives a power cut too
                directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
        except OSError:
            os.close(fd)
            staged.unlink(missing_ok=True)
            raise
        self.path, self.fd = path, fd
        self.last = 0  # the number of its last entry


class Journal:
    """This process's journal of one kind of record (``usage``, ``audit``)."""

    def __init__(self, directory: Path, kind: str, *, fsync: bool = False) -> None:
        self.directory = directory
        self.kind = kind
        self.name = f"{kind}-{uuid.uuid4().hex}"  # what the database's mark names
        self._fsync = fsync
        self._part: _Part | None = None  # the part entries go to
        self._parts = 0
        self._retired: list[_Part] = []  # earlier parts, until every entry in them is committed
        self._seq = 0  # the last number given
        self._size = 0  # of the current part
        self._synced = 0  # with fsync: every entry up to this number is on the disk
        self._syncing: asyncio.Future[None] | None = None
        self._failed_at: float | None = None  # the last append the disk refused (full volume), until it has room

    def open(self) -> None:
        if self._part is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._part = self._new_part()

    def _new_part(self) -> _Part:
        self._parts += 1
        return _Part(self.directory / f"{self.name}-{self._parts:06d}{SUFFIX}", fsync=self._fsync)

    @property
    def is_open(self) -> bool:
        return self._part is not None

    @property
    def path(self) -> Path:
        """The part entries go to now."""
        assert self._part is not None
        return self._part.path

    @property
    def appended(self) -> int:
        """The number of the last entry written (0: none yet)."""
        return self._seq

    @property
    def syncs(self) -> bool:
        """Whether an answer waits for ``fdatasync`` (:meth:`durable`)."""
        return self._fsync

    def append(self, payload: bytes) -> int:
        """Write one entry; returns its number. Raises ``OSError`` when the disk refuses it (nothing of it is left
        in the file)."""
        part = self._part
        if part is None:
            raise OSError("the journal is not open")
        seq = self._seq + 1
        frame = _FRAME.pack(len(payload), seq, _crc(len(payload), seq, payload)) + payload
        try:
            if self._size >= ROTATE_AT:
                part = self._rotate(part)
            written = os.write(part.fd, frame)
            if written != len(frame):
                raise OSError(errno.ENOSPC, f"short write to {part.path}: {written} of {len(frame)} bytes")
        except OSError:
            self._failed_at = time.monotonic()
            with contextlib.suppress(OSError):
                os.ftruncate(part.fd, self._size)  # no part of a frame is left for the next one to follow
            raise
        self._seq = part.last = seq
        self._size += written
        self._failed_at = None
        return seq

    def _rotate(self, part: _Part) -> _Part:
        if self._fsync:
            os.fdatasync(part.fd)  # what :meth:`durable` promised of it holds once it stops being synced
        following = self._new_part()
        self._retired.append(part)
        self._part, self._size = following, 0
        return following

    def accepting(self) -> bool:
        """False while the disk refuses entries (a full volume): after a refusal, room for more is checked at most
        every half second (space reserved past the end, then given back), never by writing an entry."""
        if self._failed_at is None:
            return True
        if self._part is None or time.monotonic() - self._failed_at < _RECHECK_S:
            return False
        try:
            os.posix_fallocate(self._part.fd, self._size, _ROOM)
            os.ftruncate(self._part.fd, self._size)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._part.fd, self._size)
            room = exc.errno not in (errno.ENOSPC, errno.EDQUOT) and _free(self.directory) >= _ROOM
            if not room:  # (a filesystem without fallocate: its free space is read instead)
                self._failed_at = time.monotonic()
                return False
        self._failed_at = None
        return True

    async def durable(self, seq: int) -> None:
        """Return once entry ``seq`` survives a power cut (with ``fsync``; without, it already survives the
        process). One ``fdatasync`` at a time, in a thread, covers every entry written before it began."""
        while self._fsync and self._synced < seq:
            if self._syncing is None:
                self._syncing = asyncio.ensure_future(self._sync())
            await asyncio.shield(self._syncing)

    async def _sync(self) -> None:
        upto = self._seq
        try:
            if self._part is not None:
                fd = os.dup(self._part.fd)  # the part may be retired and closed while the thread waits its turn
                try:
                    await asyncio.to_thread(os.fdatasync, fd)
                finally:
                    os.close(fd)
            self._synced = max(self._synced, upto)
        finally:
            self._syncing = None

    def committed(self, seq: int) -> None:
        """Every entry up to ``seq`` is committed to the database: earlier parts holding none past it go, and the
        current part is emptied once everything in it is committed (what it held, captured text included, does not
        stay on the disk)."""
        while self._retired and self._retired[0].last <= seq:
            part = self._retired.pop(0)
            part.path.unlink(missing_ok=True)
            os.close(part.fd)
        if seq >= self._seq and self._size and self._part is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._part.fd, 0)
                self._size = 0

    def close(self, *, remove: bool) -> None:
        """Give the locks up; ``remove``: everything in the journal is committed, its files go."""
        parts = [*self._retired, *([self._part] if self._part is not None else [])]
        for part in parts:
            if remove:
                part.path.unlink(missing_ok=True)
            os.close(part.fd)
        self._retired, self._part = [], None


class Orphan:
    """A dead process's journal (its parts, in order), locked by this process while it writes what is left."""

    def __init__(self, name: str, parts: list[tuple[Path, int]]) -> None:
        self.name = name
        self.path = parts[0][0]
        self._parts = parts
        self._damaged = False  # reading stopped before the end of its last part: it is kept aside, not removed

    def entries(self, after: int) -> Iterator[tuple[int, bytes]]:
        """(number, payload) of every whole entry numbered past ``after``, in order; reading stops at the first
        damaged or cut-off entry."""
        for index, (path, fd) in enumerate(self._parts):
            ending = yield from self._read(path, fd, after)
            if ending == _WHOLE:
                continue
            # A power cut can cut the end of the last part; damage anywhere else is kept aside, not removed.
            self._damaged = ending == _DAMAGED or index < len(self._parts) - 1
            return

    def _read(self, path: Path, fd: int, after: int) -> Generator[tuple[int, bytes], None, str]:
        with os.fdopen(os.dup(fd), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(0)
            while True:
                header = handle.read(_FRAME.size)
                if not header:
                    return _WHOLE
                if len(header) < _FRAME.size:
                    log.error("journal %s ends with a cut-off entry", path)
                    return _CUT
                length, seq, crc = _FRAME.unpack(header)
                payload = handle.read(length) if length <= size - handle.tell() else b""
                if len(payload) < length or _crc(length, seq, payload) != crc:
                    inside = len(payload) == length and handle.tell() < size
                    log.error("journal %s has a damaged entry (number %d); what follows it is not read", path, seq)
                    return _DAMAGED if inside else _CUT
                if seq > after:
                    yield seq, payload

    def remove(self) -> None:
        """Remove the parts once written; damaged ones are kept aside (``.damaged``) for someone to look at."""
        for path, _ in self._parts:
            if self._damaged:
                path.rename(path.with_name(path.name + ".damaged"))
                log.error("journal part %s is damaged: kept as %s.damaged", path, path.name)
            else:
                path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        for _, fd in self._parts:
            os.close(fd)
        self._parts = []


def orphans(directory: Path, kind: str, own: Journal | None = None) -> Iterator[Orphan]:
    """The journals of ``kind`` whose process is dead, each with every part locked for the caller (close or remove
    it). A journal with a part locked by a live process, or removed by another writer meanwhile, is skipped."""
    if not directory.is_dir():
        return
    journals: dict[str, list[Path]] = {}
    for path in sorted(directory.glob(f"{kind}-*{SUFFIX}")):
        name = path.name.removesuffix(SUFFIX).rpartition("-")[0]
        if own is None or name != own.name:
            journals.setdefault(name, []).append(path)
    for name, paths in journals.items():
        locked: list[tuple[Path, int]] = []
        for path in paths:
            fd = _lock(path)
            if fd is None:
                break
            locked.append((path, fd))
        else:
            yield Orphan(name, locked)
            continue
        for _, fd in locked:
            os.close(fd)


def _free(directory: Path) -> int:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def _lock(path: Path) -> int | None:
    """``path`` opened and locked, or None while its process lives (or once it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:  # removed (and perhaps made again) meanwhile
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


class Sink(Protocol[T]):
    """Where one kind of journaled record goes: the database, with each journal's mark."""

    def mark(self, journal: str) -> int:
        """How far ``journal`` is committed."""

    def decode(self, payload: bytes) -> T:
        """An entry as the record it holds (one that does not decode: the record saying so)."""

    def write(self, journal: str, entries: list[tuple[int, T]]) -> None:
        """Commit ``entries`` (number, record) with their mark; a record the database refuses is isolated."""

    def forget(self, journal: str) -> None:
        """Drop ``journal``'s mark (its files are gone)."""


def adopt(journal: Journal, sink: Sink[T], batch_size: int) -> None:
    """Write what dead processes' journals of ``journal``'s kind hold past their marks, in batches, then remove
    them; one the database does not take now is tried again later."""
    try:
        for orphan in orphans(journal.directory, journal.kind, own=journal):
            try:
                written = _replay(orphan, sink, batch_size)
            except Exception:
                log.exception("journal %s of a dead process not written yet", orphan.path)
                orphan.close()
                continue
            if written:
                log.warning("wrote %d records left in the journal of a dead process (%s)", written, orphan.name)
    except OSError:
        log.exception("the %s journals of dead processes could not be read", journal.kind)


def _replay(orphan: Orphan, sink: Sink[T], batch_size: int) -> int:
    batch: list[tuple[int, T]] = []
    written = 0
    for seq, payload in orphan.entries(sink.mark(orphan.name)):
        batch.append((seq, sink.decode(payload)))
        if len(batch) >= batch_size:
            sink.write(orphan.name, batch)
            written, batch = written + len(batch), []
    if batch:
        sink.write(orphan.name, batch)
        written += len(batch)
    orphan.remove()
    sink.forget(orphan.name)
    return written


def retire(journal: Journal, sink: Sink[T], *, drained: bool) -> None:
    """Close this process's journal at stop: removed with its mark when everything in it is committed; else left
    for the next writer to adopt."""
    journal.close(remove=drained)
    if drained:
        try:
            sink.forget(journal.name)
        except Exception:
            log.warning("the mark of journal %s is left in the database", journal.name)


def journaled(journal: Journal | None, record: object) -> int | None:
    """``record``'s entry in ``journal``, or None where it cannot have one (no journal, or not open; its disk
    refuses; a value JSON cannot carry): whoever answers for it then waits for the database instead."""
    if journal is None or not journal.is_open:
        return None
    try:
        return journal.append(msgspec.json.encode(record))
    except OSError as exc:
        log.warning("%s journal refused a record (%s); the answer waits for the database", journal.kind, exc)
    except (TypeError, ValueError) as exc:
        log.error("a %s record could not be journaled (%s); the answer waits for the database", journal.kind, exc)
    return None

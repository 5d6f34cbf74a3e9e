"""Settlements the database would not take, kept on disk until they land.

A settlement turns a request's reservations into usage. When it cannot be written (the database is down,
a transaction fails), dropping it would leave the reservation to the sweeper, which releases it free: the
request would never be charged. Instead it is appended to ``settlements-<gateway>.jsonl`` in the run
folder (one JSON line, flushed and fsynced before the request is considered settled) and replayed by a
background task until it lands. Replaying is idempotent: a settlement whose reservation rows are gone
(it landed before, or its gateway was declared dead and the rows released) changes nothing.

Each journal has a lock file held by its gateway for as long as it runs. A journal whose lock nobody
holds was left by a gateway that stopped before replaying it; the next gateway on the same data folder
adopts and replays it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PREFIX = "settlements-"


@dataclass(frozen=True)
class Settlement:
    request_id: str
    total_tokens: int
    cost_micros: int
    counts_as_call: bool


class SettlementJournal:
    """The append-only journal of one gateway's unwritten settlements."""

    def __init__(self, directory: Path, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self.path = directory / f"{PREFIX}{gateway_id}.jsonl"
        self._lock_path = directory / f"{PREFIX}{gateway_id}.lock"
        self._lock_file: IO[bytes] | None = None
        self._mutex = threading.Lock()  # appends (request threads) against replay's rewrite
        self._replaying = threading.Lock()

    def claim(self, *, own: bool = False) -> bool:
        """Hold this journal's lock while the process runs; False when a live process holds it (or, for
        another gateway's journal, when it has no lock file). ``own``: this gateway's journal, whose lock
        file appears already locked (made aside, locked, then renamed), so no scan ever takes it for a
        dead gateway's. A gateway that dies leaves its lock file: the journal is found by it."""
        if self._lock_file is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle: IO[bytes]
        if own:
            staged = self._lock_path.with_name(self._lock_path.name + ".tmp")
            handle = staged.open("wb")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            os.replace(staged, self._lock_path)
            self._lock_file = handle
            return True
        try:
            handle = self._lock_path.open("rb")
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        if not self._lock_path.exists():  # released and removed by its last holder meanwhile
            handle.close()
            return False
        self._lock_file = handle
        return True

    def release(self) -> None:
        """Give up the lock; the files are removed when nothing is left to replay."""
        if self._lock_file is None:
            return
        with self._mutex:
            if not self._read():
                self.path.unlink(missing_ok=True)
                self._lock_path.unlink(missing_ok=True)
        self._lock_file.close()
        self._lock_file = None

    def append(self, settlement: Settlement) -> None:
        """Write one settlement durably (fsynced) before returning; raises OSError when the disk refuses."""
        line = json.dumps(asdict(settlement), separators=(",", ":")) + "\n"
        with self._mutex:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = "\n" + line  # after a line a crash cut short: keep this one readable
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)

    def pending(self) -> list[Settlement]:
        with self._mutex:
            return self._read()

    def replay(self, apply: Callable[[Settlement], object]) -> int:
        """Apply the pending settlements in order until one fails (the database is likely still away); drop
        those applied. Returns how many are left. Appends go on meanwhile: they land after the entries read
        here, which only this method removes (one replay at a time)."""
        with self._replaying:
            entries = self.pending()
            applied = 0
            for entry in entries:
                try:
                    apply(entry)
                except Exception as exc:
                    log.warning("settlement of %s not replayed yet: %s", entry.request_id, exc)
                    break
                applied += 1
            with self._mutex:
                left = self._read()[applied:]
                if applied:
                    self._rewrite(left)
                return len(left)

    def _read(self) -> list[Settlement]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entries.append(Settlement(**json.loads(line)))
            except (ValueError, TypeError):  # a line cut short by a crash mid-write: said loudly, never guessed
                log.error("unreadable settlement on line %d of %s skipped: %r", number, self.path, line[:200])
        return entries

    def _rewrite(self, entries: list[Settlement]) -> None:
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        staged = self.path.with_suffix(".tmp")
        with staged.open("w") as handle:
            handle.writelines(json.dumps(asdict(e), separators=(",", ":")) + "\n" for e in entries)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def orphans(directory: Path, own_id: str) -> list[SettlementJournal]:
    """Journals of gateways that stopped on this data folder with settlements left, now claimed by us."""
    if not directory.is_dir():
        return []
    found = []
    names = {path.stem[len(PREFIX) :] for path in directory.glob(f"{PREFIX}*.lock")}
    for gateway_id in sorted(names - {own_id}):
        journal = SettlementJournal(directory, gateway_id)
        if not journal.claim():
            continue  # its gateway runs
        if journal.pending():
            found.append(journal)
        else:
            journal.release()  # a gateway that died with nothing to replay: only its lock file was left
    return found

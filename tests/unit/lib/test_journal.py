"""The record journal (appliance/lib/journal.py): entries read back in order, a live process's journal never
taken, a dead one's taken by exactly one writer, a damaged tail ends it loudly, and a drained journal shrinks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.lib import journal as journal_module
from appliance.lib.journal import Journal, orphans

HOLDER = """
import sys, time
from pathlib import Path
from appliance.lib.journal import Journal
journal = Journal(Path(sys.argv[1]), "usage")
journal.open()
for n in range(int(sys.argv[2])):
    journal.append(f"entry {n}".encode())
print(journal.path, flush=True)
time.sleep(600)
"""


def holder(directory: Path, entries: int) -> tuple[subprocess.Popen[str], Path]:
    """A process that writes ``entries`` entries to its own journal and keeps running (holding the lock)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), str(entries)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_live_process_journal_is_never_taken_and_a_dead_one_is_taken_once(tmp_path: Path) -> None:
    process, path = holder(tmp_path, 3)
    try:
        assert list(orphans(tmp_path, "usage")) == [], "a running process's journal is not an orphan"
        process.send_signal(signal.SIGKILL)
        process.wait()
        [orphan] = list(orphans(tmp_path, "usage"))
        assert orphan.path == path
        assert [(seq, payload) for seq, payload in orphan.entries(0)] == [
            (1, b"entry 0"),
            (2, b"entry 1"),
            (3, b"entry 2"),
        ]
        assert [seq for seq, _ in orphan.entries(2)] == [3], "what the database holds is not read again"
        assert list(orphans(tmp_path, "usage")) == [], "locked by the writer taking it: nobody else takes it"
        assert list(orphans(tmp_path, "audit")) == [], "another kind's writer does not look at it"
        orphan.remove()
        assert not path.exists() and list(orphans(tmp_path, "usage")) == []
    finally:
        process.kill()
        process.wait()


def test_a_journal_removed_while_a_second_writer_waited_for_it_is_not_taken_again(tmp_path: Path) -> None:
    process, path = holder(tmp_path, 1)
    process.kill()
    process.wait()
    first = orphans(tmp_path, "usage")
    [taken] = list(first)
    late = os.open(path, os.O_RDONLY)  # a second writer opened it before the first removed it
    try:
        taken.remove()
        assert list(orphans(tmp_path, "usage")) == []
        assert not path.exists()
    finally:
        os.close(late)


def test_a_damaged_or_cut_off_tail_ends_the_journal_without_guessing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    process, path = holder(tmp_path, 3)
    process.kill()
    process.wait()
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the last entry cut short (a power cut mid-write)
    [orphan] = list(orphans(tmp_path, "usage"))
    assert [seq for seq, _ in orphan.entries(0)] == [1, 2]
    assert "damaged entry" in caplog.text or "cut-off" in caplog.text
    orphan.close()

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # a flipped byte inside the second entry
    path.write_bytes(bytes(flipped))
    [orphan] = list(orphans(tmp_path, "usage"))
    assert [seq for seq, _ in orphan.entries(0)] == [1]
    orphan.close()


def test_a_journal_moves_to_new_parts_and_drops_those_committed_so_it_stays_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "ROTATE_AT", 100)
    journal = Journal(tmp_path, "audit")
    journal.open()
    numbers = [journal.append(b"x" * 30 + str(n).encode()) for n in range(12)]
    assert numbers == list(range(1, 13))
    parts = sorted(tmp_path.glob("audit-*.journal"))
    assert len(parts) == 4 and all(path.stat().st_size <= 100 + 60 for path in parts)
    journal.committed(7)  # the first two parts (entries 1-3, 4-6) hold nothing past 7
    assert sorted(tmp_path.glob("audit-*.journal")) == parts[2:]
    journal.close(remove=False)  # as if its process died: the next writer reads the parts left, in order
    [orphan] = list(orphans(tmp_path, "audit"))
    assert [seq for seq, _ in orphan.entries(7)] == [8, 9, 10, 11, 12]
    orphan.remove()
    assert list(tmp_path.glob("audit-*.journal")) == []


def test_an_unopened_journal_refuses_to_pretend(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Journal(tmp_path, "usage").append(b"x")


async def test_with_fsync_an_entry_is_durable_only_after_fdatasync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    journal = Journal(tmp_path, "usage", fsync=True)
    journal.open()
    numbers = [journal.append(f"{n}".encode()) for n in range(20)]
    await asyncio.gather(*(journal.durable(seq) for seq in numbers))
    assert 1 <= len(synced) <= 2, "answers waiting together share one fdatasync"
    await journal.durable(numbers[-1])
    assert len(synced) <= 2, "what is on the disk already is not synced again"
    plain = Journal(tmp_path, "audit")
    plain.open()
    await plain.durable(plain.append(b"x"))
    assert len(synced) <= 2, "without fsync nothing is synced"
    journal.close(remove=True)
    plain.close(remove=True)


def test_a_part_damaged_inside_is_kept_aside_and_a_committed_journal_is_emptied(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "usage")
    journal.open()
    for n in range(3):
        journal.append(f"entry {n}".encode())
    journal.committed(3)
    assert journal.path.stat().st_size == 0, "nothing committed stays on the disk"
    for n in range(3):
        journal.append(f"entry {n}".encode())
    path = journal.path
    journal.close(remove=False)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # damage inside the second entry, whole entries after it
    path.write_bytes(bytes(data))
    [orphan] = list(orphans(tmp_path, "usage"))
    assert [seq for seq, _ in orphan.entries(0)] == [4]
    orphan.remove()
    assert not path.exists() and path.with_name(path.name + ".damaged").exists(), "kept for someone to look at"
    assert list(orphans(tmp_path, "usage")) == []

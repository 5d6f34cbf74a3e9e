"""Progress of long work on standard error: a line when a stage starts, a line every few seconds while it runs,
and a line when it ends, with the files and bytes it handled and the time it took. No dependency, no terminal
tricks (the lines read the same in a log file and on a console)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Stage:
    """One stage's counters; :meth:`add` may print an interim line (at most every ``every_s`` seconds)."""

    def __init__(self, progress: Progress, name: str) -> None:
        self._progress = progress
        self.name = name
        self.files = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._last_line = self.started

    def add(self, *, files: int = 0, nbytes: int = 0) -> None:
        self.files += files
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last_line >= self._progress.every_s:
            self._last_line = now
            self._progress.line(f"  {self.name}: {self.summary()} ...")

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def summary(self) -> str:
        parts = []
        if self.files:
            parts.append(f"{self.files} file{'s' if self.files != 1 else ''}")
        if self.bytes:
            parts.append(human_bytes(self.bytes))
        parts.append(f"{self.elapsed_s:.1f}s")
        return ", ".join(parts)


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, every_s: float = 5.0) -> None:
        self._stream = stream
        self.enabled = enabled
        self.every_s = every_s

    def line(self, text: str) -> None:
        if self.enabled:
            stream = self._stream or sys.stderr
            print(text, file=stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        stage = Stage(self, name)
        self.line(f"{name} ...")
        try:
            yield stage
        except BaseException:
            self.line(f"{name}: FAILED after {stage.elapsed_s:.1f}s")
            raise
        self.line(f"{name}: done ({stage.summary()})")

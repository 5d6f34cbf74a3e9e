"""Run tests/support/journaled_writer.py: it acknowledges its records, then kills itself with SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def killed_writer(kind: str, data_dir: Path, records: int, committed: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.journaled_writer", kind, str(data_dir), str(records), str(committed)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", "the writer did not acknowledge its records"
        assert process.wait(timeout=30) == -signal.SIGKILL, "the writer did not die by SIGKILL"
    finally:
        process.kill()
        process.wait()

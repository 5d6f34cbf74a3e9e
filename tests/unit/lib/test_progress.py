"""The progress lines long commands print on standard error."""

from __future__ import annotations

import io
import re

import pytest

from appliance.lib.progress import Progress, human_bytes


def test_a_stage_prints_its_start_interim_counts_and_end() -> None:
    out = io.StringIO()
    progress = Progress(out, every_s=0.0)
    with progress.stage("copying") as stage:
        stage.add(files=1, nbytes=2048)
        stage.add(files=1, nbytes=3 * 1024 * 1024)
    lines = out.getvalue().splitlines()
    assert lines[0] == "copying ..."
    assert re.fullmatch(r"  copying: 1 file, 2\.0 KiB, \d+\.\ds \.\.\.", lines[1])
    assert re.fullmatch(r"copying: done \(2 files, 3\.0 MiB, \d+\.\ds\)", lines[-1])


def test_a_failed_stage_says_so_and_a_quiet_one_prints_nothing() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress(out).stage("dumping"):
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("dumping: FAILED after ")
    quiet = io.StringIO()
    with Progress(quiet, enabled=False).stage("x") as stage:
        stage.add(files=3)
    assert quiet.getvalue() == ""
    assert human_bytes(512) == "512 B" and human_bytes(5 * 1024**3) == "5.0 GiB"

"""Supervision and lifecycle through the CLI. Runs last (it kills an engine and stops the appliance)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from appliance.engines.runner import pid_alive
from tests.integration.conftest import EMBED_MODEL, Appliance

pytestmark = pytest.mark.integration


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_status_json_has_the_documented_keys(appliance: Appliance) -> None:
    status = appliance.status()
    assert status["gateway_url"] == appliance.gateway_url
    assert status["data_dir"] == str(appliance.data_dir)
    assert status["healthy"] is True
    assert {e["model"] for e in status["engines"]} == {"smollm2-135m-instruct", EMBED_MODEL}
    for engine in status["engines"]:
        assert {"model", "url", "pid", "healthy"} <= set(engine)
        assert engine["healthy"] is True and isinstance(engine["pid"], int)
    assert http_status(appliance.gateway_url + "/readyz") == 200


def test_crashed_engine_is_reported_then_restarted(appliance: Appliance, client: OpenAI) -> None:
    engine = next(e for e in appliance.status()["engines"] if e["model"] == EMBED_MODEL)
    os.killpg(engine["pid"], signal.SIGKILL)  # a real crash: the engine and its children die at once

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reported = next(e for e in appliance.status()["engines"] if e["model"] == EMBED_MODEL)
        if not reported["healthy"]:
            break
        time.sleep(0.5)
    assert reported["healthy"] is False
    assert appliance.cli("status").returncode == 1
    assert http_status(appliance.gateway_url + "/readyz") == 503

    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model=EMBED_MODEL, input="hello")
    assert info.value.status_code == 503

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        reported = next(e for e in appliance.status()["engines"] if e["model"] == EMBED_MODEL)
        if reported["healthy"]:
            break
        time.sleep(2)
    assert reported["healthy"] is True and reported["restarts"] == 1
    assert len(client.embeddings.create(model=EMBED_MODEL, input="hello").data[0].embedding) == 384


def test_down_stops_everything_it_started(appliance: Appliance) -> None:
    status = appliance.status()
    pids = [status["supervisor_pid"], status["gateway"]["pid"], *(e["pid"] for e in status["engines"])]
    assert all(pids)
    result = appliance.cli("down", timeout=180)
    assert result.returncode == 0, result.stderr
    time.sleep(1)
    survivors = [pid for pid in pids if pid_alive(pid)]  # a zombie awaiting its reaper runs nothing
    assert survivors == []
    # No process of any of those groups is left either (the engines' worker children included).
    data_dir = str(appliance.data_dir)
    orphans = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if data_dir.encode() in handle.read() and pid_alive(int(entry)):
                        orphans.append(int(entry))
            except OSError:
                pass
    assert orphans == []
    assert appliance.status()["running"] is False
    assert appliance.cli("status").returncode == 3
    # Starting and stopping are in the audit trail, and the whole session's chain verifies.
    exported = [json.loads(line) for line in appliance.cli("audit", "export").stdout.splitlines()]
    assert [e["event_type"] for e in exported if e["event_type"].startswith("appliance.")][-2:] == [
        "appliance.up",
        "appliance.down",
    ]
    assert appliance.cli("audit", "verify").returncode == 0

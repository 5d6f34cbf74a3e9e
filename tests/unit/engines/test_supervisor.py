"""`appliance down` against `appliance up` in the foreground (as `make run` runs it): the supervisor is not a
process group leader there, and the engines and the gateway it supervises must stay stopped.

The engine is a stand-in: the engines' Python is a script that serves the fake engine on the port vLLM would
use (the supervisor's own behaviour is under test, not vLLM's); the gateway is the real one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.engines.runner import http_ok, pid_alive
from appliance.settings import REPO_ROOT
from tests.support.fake_engine import free_port

PREPARED = REPO_ROOT / "var" / "models"  # the prepared bundled models (make setup)


def stand_in_engine_venv(root: Path) -> Path:
    """A 'virtual environment' whose python runs the fake engine on the --port it is given."""
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        "#!/bin/sh\n"
        'port=$(echo "$@" | sed -n "s/.*--port \\([0-9]*\\).*/\\1/p")\n'
        f"cd {REPO_ROOT} && exec {sys.executable} -c "
        '"from tests.support.fake_engine import serve_forever; serve_forever($port)"\n'
    )
    python.chmod(0o755)
    return root / "venv"


@pytest.fixture
def foreground(tmp_path: Path) -> Iterator[tuple[dict[str, str], subprocess.Popen[bytes]]]:
    if not (PREPARED / "minilm-l6-v2").is_dir():
        pytest.skip("the bundled embedding model is not prepared (make setup)")
    env = {
        **os.environ,
        "APPLIANCE_DATA_DIR": str(tmp_path / "data"),
        "APPLIANCE_CONFIG": str(tmp_path / "none.toml"),
        "APPLIANCE_MODELS_CACHE_DIR": str(PREPARED),
        "APPLIANCE_ENGINES__VENV": str(stand_in_engine_venv(tmp_path)),
        "APPLIANCE_ENGINES__MODELS": '["minilm-l6-v2"]',
        "APPLIANCE_ENGINES__PORT_BASE": str(free_port()),
        "APPLIANCE_SERVER__PORT": str(free_port()),
    }
    # A shell leads the process group and runs `appliance up` as its child, as make does in a terminal.
    shell = subprocess.Popen(
        ["sh", "-c", f"{sys.executable} -m appliance.cli up; echo exited"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield env, shell
    finally:
        state_file = tmp_path / "data" / "run" / "state.json"
        pids = []
        if state_file.exists():
            state = json.loads(state_file.read_text())
            pids = [state["supervisor_pid"], state["gateway"]["pid"], *(e["pid"] for e in state["engines"])]
        for pid in [p for p in pids if p]:
            try:
                os.killpg(pid, signal.SIGKILL)  # engines and the gateway lead their own groups
            except ProcessLookupError:
                pass
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shell.wait(10)


def running_state(data_dir: Path, timeout_s: float = 120.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = data_dir / "run" / "state.json"
        if path.exists():
            state = json.loads(path.read_text())
            if state["phase"] == "running":
                return dict(state)
        time.sleep(0.5)
    raise AssertionError("the appliance did not come up")


def test_down_stops_a_foreground_supervisor_and_nothing_comes_back(
    foreground: tuple[dict[str, str], subprocess.Popen[bytes]],
) -> None:
    env, _shell = foreground
    data_dir = Path(env["APPLIANCE_DATA_DIR"])
    state = running_state(data_dir)
    supervisor = int(state["supervisor_pid"])  # type: ignore[call-overload]
    gateway_url = f"http://127.0.0.1:{env['APPLIANCE_SERVER__PORT']}/healthz"
    assert http_ok(gateway_url) and os.getpgid(supervisor) != supervisor, "a foreground supervisor, up"

    down = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "down"], env=env, capture_output=True, text=True, timeout=120
    )
    assert down.returncode == 0 and "the appliance is stopped" in down.stdout, down.stdout + down.stderr
    assert not pid_alive(supervisor), "down waits for the supervisor to end"
    time.sleep(3.0)  # longer than the supervisor's watch interval and its first restart delay
    assert not http_ok(gateway_url), "the gateway was restarted after down"
    assert not (data_dir / "run" / "state.json").exists()

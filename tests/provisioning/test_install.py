"""The install media and the playbooks, without a node: tampered media is refused before anything is touched, no
task can reach the network, and the playbooks pass ansible-lint's production profile.

Converging a node is tested for real in tests/node (a booted Debian 12 node, services started, used over the
network); the chroot converge that stood here could not start any service and is superseded by it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.settings import REPO_ROOT

pytestmark = pytest.mark.provisioning

CLI = [sys.executable, "-m", "appliance.cli"]


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(media folder, public key): the appliance's own wheel and the playbooks, signed (nothing downloaded)."""
    folder = tmp_path_factory.mktemp("media")
    keys = folder / "keys"
    assert run([*CLI, "media", "keygen", "--out", str(keys)]).returncode == 0
    args = [
        *CLI,
        "media",
        "build",
        "--out",
        str(folder / "media"),
        "--signing-key",
        str(keys / "media-signing-key.pem"),
    ]
    empty = folder / "no-models"  # no prepared model: the media carries none
    empty.mkdir()
    result = run(args, timeout=900, env=dict(os.environ, APPLIANCE_MODELS_CACHE_DIR=str(empty)))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "media", keys / "media-signing-key.pub.pem"


def test_tampered_media_is_refused_before_any_host_is_touched(media: tuple[Path, Path], tmp_path: Path) -> None:
    folder, pubkey = media
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    target = sorted((copy / "wheels").glob("appliance-*.whl"))[0]
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    root = tmp_path / "node"
    root.mkdir()
    inventory = tmp_path / "inventory.yml"
    host = {"ansible_host": str(root), "ansible_connection": "community.general.chroot"}
    inventory.write_text(
        yaml.safe_dump({"appliance": {"hosts": {"node1": host}, "vars": {"appliance_subnet": "10.20.0.0/24"}}})
    )
    command = [
        "unshare",
        "--net",
        "--",
        *CLI,
        "install",
        "--media",
        str(copy),
        "-i",
        str(inventory),
        "--pubkey",
        str(pubkey),
        "--json",
    ]
    started = time.monotonic()
    result = run(command, timeout=600, cwd=REPO_ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and f"wheels/{target.name} does not match its sha256" in output, output[-3000:]
    assert time.monotonic() - started < 120
    assert not any(root.iterdir()), "nothing was done on the node"
    assert '"rc"' not in result.stdout, "no play ran"


def test_no_task_can_reach_the_network() -> None:
    """Besides converging inside a namespace with no network: no module that downloads, no package manager,
    and pip only ever with --no-index."""
    forbidden = re.compile(
        r"\b(ansible\.builtin\.(get_url|uri|apt|yum|dnf|package|apt_repository|git|pip)|community\.general\.(npm|gem))\b"
    )
    for path in (REPO_ROOT / "playbooks").rglob("*.yml"):
        text = path.read_text()
        assert not forbidden.search(text), f"{path}: a task that could reach the network"
        for line in text.splitlines():
            if ("/bin/pip" in line or "pip install" in line) and "uninstall" not in line:  # removing fetches nothing
                block = text[text.index(line) : text.index(line) + 400]
                assert "--no-index" in block, f"{path}: pip without --no-index"


def test_playbooks_pass_ansible_lint_production_profile() -> None:
    lint = shutil.which("ansible-lint", path=str(Path(sys.executable).parent))
    assert lint is not None
    result = run(
        [lint, "--offline", "--profile", "production", "--nocolor", "."], cwd=REPO_ROOT / "playbooks", timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

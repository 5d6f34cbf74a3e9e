"""Provisioning from offline media, for real: a Debian bookworm root made with debootstrap, converged by
`appliance install` (ansible-runner, the community.general.chroot connection) from media built here.

Services cannot start in a chroot (no init system runs there): units are written and enabled, and every
handler that would start or restart a service is skipped (`appliance_start_services: false`). The engines'
own packages (vLLM and torch, gigabytes) are not put on the test media, so `vllm_packages` is empty here; the
appliance and every one of its dependencies are installed from the media's wheelhouse with `pip --no-index`.

The converge runs inside a network namespace with no network at all (`unshare --net`): it succeeding is the
proof that no task reaches the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.settings import REPO_ROOT

pytestmark = pytest.mark.provisioning

WORK = Path("/var/tmp/appliance-provisioning-test")
ROOTFS_CACHE = WORK / "bookworm-rootfs.tar"
PACKAGES = "python3,python3-venv,python3-cryptography,python3-cffi-backend,nftables,openssl,ca-certificates"
CLI = [sys.executable, "-m", "appliance.cli"]
PRINT_SETTINGS = "from appliance.settings import Settings; s = Settings(); print(s.server.port, s.retrieval.qdrant_url)"


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)


@pytest.fixture(scope="module")
def rootfs() -> Path:
    """A minimal Debian bookworm root (debootstrap, once; kept as a tarball between runs on this machine)."""
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        pytest.fail("provisioning tests need root and debootstrap (`make test` installs it)")
    WORK.mkdir(parents=True, exist_ok=True)
    if not ROOTFS_CACHE.exists():
        build = WORK / "debootstrap"
        shutil.rmtree(build, ignore_errors=True)
        started = time.monotonic()
        result = run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={PACKAGES}",
                "bookworm",
                str(build),
                "http://deb.debian.org/debian",
            ],
            timeout=1200,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        print(f"\ndebootstrap in {time.monotonic() - started:.0f}s", file=sys.stderr)
        assert run(["tar", "-C", str(build), "-cf", str(ROOTFS_CACHE), "."]).returncode == 0
        shutil.rmtree(build)
    return ROOTFS_CACHE


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(media folder, public key): the appliance's wheel and its dependencies' wheels (downloaded: building
    is the step allowed to use the network), the embedding model when it is prepared here, the playbooks,
    and a stand-in file for the Qdrant binary (the real one is not on this machine)."""
    folder = tmp_path_factory.mktemp("media")
    keys = folder / "keys"
    assert run([*CLI, "media", "keygen", "--out", str(keys)]).returncode == 0
    qdrant = folder / "qdrant"
    qdrant.write_bytes(b"#!/bin/sh\necho 'stand-in for the Qdrant server binary'\n")
    args = [
        *CLI,
        "media",
        "build",
        "--out",
        str(folder / "media"),
        "--signing-key",
        str(keys / "media-signing-key.pem"),
        "--download",
        "appliance",
        "--component",
        f"qdrant={qdrant}@test",
    ]
    prepared = REPO_ROOT / "var" / "models"
    env = dict(os.environ, APPLIANCE_MODELS_CACHE_DIR=str(prepared))
    if (prepared / "minilm-l6-v2" / ".prepared").exists():
        args += ["--model", "minilm-l6-v2"]
    result = run(args, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "media", keys / "media-signing-key.pub.pem"


@pytest.fixture
def node(rootfs: Path) -> Iterator[Path]:
    """A fresh copy of the root, with /proc mounted (facts read it), unmounted and removed afterwards."""
    root = WORK / "node"
    if (root / "proc").is_mount():
        run(["umount", str(root / "proc")])
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    assert run(["tar", "-C", str(root), "-xf", str(rootfs)]).returncode == 0
    assert run(["mount", "-t", "proc", "proc", str(root / "proc")]).returncode == 0
    yield root
    run(["umount", str(root / "proc")])
    shutil.rmtree(root, ignore_errors=True)


def inventory(folder: Path, root: Path, media: Path, **extra: Any) -> Path:
    models = [{"name": "minilm-l6-v2", "port": 8102, "runner": "pooling"}] if (media / "models").exists() else []
    data = {
        "appliance": {
            "hosts": {
                "node1": {
                    "ansible_host": str(root),
                    "ansible_connection": "community.general.chroot",
                    "ansible_python_interpreter": "/usr/bin/python3",
                    "ansible_become": False,
                }
            },
            "vars": {
                "appliance_subnet": "10.20.0.0/24",
                "appliance_start_services": False,
                "preflight_min_memory_mb": 1024,
                "preflight_min_disk_gb": 1,
                "vllm_packages": [],
                "vllm_models": models,
                "pki_hostnames": ["node1.test"],
                "base_ntp_servers": ["10.20.0.1"],
                **extra,
            },
        }
    }
    path = folder / "inventory.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def install(media: Path, pubkey: Path, inventory_path: Path, offline: bool = True) -> tuple[int, dict[str, Any], str]:
    """`appliance install`, inside a network namespace with no network when ``offline``."""
    command = [*CLI, "install", "--media", str(media), "-i", str(inventory_path), "--pubkey", str(pubkey), "--json"]
    if offline:
        command = ["unshare", "--net", "--", *command]
    started = time.monotonic()
    result = run(command, timeout=1200, cwd=REPO_ROOT)
    print(f"\nappliance install in {time.monotonic() - started:.0f}s", file=sys.stderr)
    lines = result.stdout.strip().splitlines()
    recap = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return result.returncode, recap, result.stdout + result.stderr


def ids(root: Path, database: str) -> dict[str, int]:
    """name -> id from the node's own /etc/passwd or /etc/group (the host's names may differ)."""
    return {line.split(":")[0]: int(line.split(":")[2]) for line in (root / "etc" / database).read_text().splitlines()}


def owned(root: Path, relative: str, user: str, group: str, mode: int) -> None:
    stat = (root / relative).stat()
    users, groups = ids(root, "passwd"), ids(root, "group")
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o7777) == (users[user], groups[group], mode), relative


def test_the_node_converges_offline_and_a_second_run_changes_nothing(
    node: Path, media: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, pubkey = media
    first_rc, first, output = install(folder, pubkey, inventory(tmp_path, node, folder))
    assert first_rc == 0 and first["rc"] == 0, output[-6000:]
    assert first["changed"]["node1"] > 10 and not first["failures"]

    users = ids(node, "passwd")
    assert {"appliance", "vllm", "qdrant"} <= set(users)
    assert re.search(r"^vllm:[^:]*:\d+:appliance$", (node / "etc/group").read_text(), re.MULTILINE)
    for relative, user, group, mode in (
        ("etc/appliance", "root", "appliance", 0o750),
        ("var/lib/appliance", "appliance", "appliance", 0o750),
        ("etc/appliance/appliance.toml", "root", "appliance", 0o640),
        ("etc/appliance/pki/ca.key", "root", "root", 0o600),
        ("etc/appliance/pki/gateway.key", "root", "appliance", 0o640),
        ("etc/qdrant/config.yaml", "root", "qdrant", 0o640),
        ("etc/qdrant/api-key", "root", "qdrant", 0o640),
        ("opt/qdrant/bin/qdrant", "root", "root", 0o755),
    ):
        owned(node, relative, user, group, mode)

    nft = (node / "etc/nftables.conf").read_text()
    assert "policy drop;" in nft and 'oif "lo" accept' in nft and "ct state established,related accept" in nft
    assert "ip daddr 10.20.0.0/24 accept" in nft
    assert (node / "etc/systemd/system/sysinit.target.wants/nftables.service").is_symlink()
    qdrant = yaml.safe_load((node / "etc/qdrant/config.yaml").read_text())
    assert qdrant["telemetry_disabled"] is True and qdrant["service"]["enable_tls"] is True
    assert len(qdrant["service"]["api_key"]) == 40
    assert "NTP=10.20.0.1" in (node / "etc/systemd/timesyncd.conf.d/appliance.conf").read_text()

    config = (node / "etc/appliance/appliance.toml").read_text()
    assert 'qdrant_url = "https://127.0.0.1:6333"' in config
    unit = (node / "etc/systemd/system/appliance.service").read_text()
    assert "User=appliance" in unit and "APPLIANCE_CONFIG=/etc/appliance/appliance.toml" in unit
    assert (node / "etc/systemd/system/multi-user.target.wants/appliance.service").is_symlink()
    if (folder / "models").exists():
        engine = (node / "etc/systemd/system/vllm-minilm-l6-v2.service").read_text()
        for variable in ("HF_HUB_OFFLINE=1", "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1"):
            assert variable in engine
        assert "--runner pooling" in engine
        assert (node / "var/lib/vllm/models/minilm-l6-v2/model.yaml").is_file()

    # The installed appliance runs on the node's own Python, with the configuration the role wrote.
    check = run(
        ["chroot", str(node), "/opt/appliance/venv/bin/python", "-c", PRINT_SETTINGS],
        env={"APPLIANCE_CONFIG": "/etc/appliance/appliance.toml", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["8080", "https://127.0.0.1:6333"]
    certificate = run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(node / "etc/appliance/pki/ca.crt"),
            str(node / "etc/appliance/pki/gateway.crt"),
        ]
    )
    assert certificate.returncode == 0, certificate.stdout + certificate.stderr

    second_rc, second, output = install(folder, pubkey, inventory(tmp_path, node, folder))
    assert second_rc == 0, output[-6000:]
    changed = [line for line in output.splitlines() if line.startswith(("TASK", "changed:"))]
    assert second["changed"] == {} and not second["failures"], f"a second run changes nothing: {changed}"


def test_a_failed_run_is_completed_by_running_again(node: Path, media: tuple[Path, Path], tmp_path: Path) -> None:
    folder, pubkey = media
    broken = inventory(tmp_path, node, folder, vllm_models=[{"name": "not-on-the-media", "port": 8199}])
    rc, recap, output = install(folder, pubkey, broken)
    assert rc != 0 and recap["failures"], output[-3000:]
    assert (node / "etc/appliance/pki/ca.crt").exists(), "it failed part-way, after the first roles"
    rc, recap, output = install(folder, pubkey, inventory(tmp_path, node, folder))
    assert rc == 0 and not recap["failures"], output[-6000:]
    assert (node / "etc/systemd/system/appliance.service").exists()


def test_tampered_media_is_refused_before_any_host_is_touched(
    node: Path, media: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, pubkey = media
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    target = sorted((copy / "wheels").glob("appliance-*.whl"))[0]
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    rc, _recap, output = install(copy, pubkey, inventory(tmp_path, node, copy))
    assert rc == 2 and f"wheels/{target.name} does not match its sha256" in output
    assert not (node / "etc/appliance").exists(), "nothing was done on the node"


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
            if "/bin/pip" in line or "pip install" in line:
                block = text[text.index(line) : text.index(line) + 400]
                assert "--no-index" in block, f"{path}: pip without --no-index"


def test_playbooks_pass_ansible_lint_production_profile() -> None:
    lint = shutil.which("ansible-lint", path=str(Path(sys.executable).parent))
    assert lint is not None
    result = run(
        [lint, "--offline", "--profile", "production", "--nocolor", "."], cwd=REPO_ROOT / "playbooks", timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

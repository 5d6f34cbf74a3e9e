"""Install media: how long building and verifying take, and what verification costs per GiB.

Builds media with the appliance's wheel (built here), the bundled models prepared in var/models, and the
playbooks, signs it with a fresh key, verifies it three times and prints the times. The baseline, measured
in the same run, is reading every file once (sha256 of the same bytes): verification should cost little more.

Then, as root and with the Debian root that tests/provisioning caches (/var/tmp/appliance-provisioning-test),
media with the appliance's dependencies is built and `appliance install` converges a fresh copy of that root
twice through the chroot connection, with no network (`unshare --net`): the first converge and the second
(nothing to change) are timed.

Usage: .venv/bin/python bench/install.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.media.bundle import sha256_file, verify_media  # noqa: E402


def main() -> None:
    models = ROOT / "var" / "models"
    if not any(models.glob("*/.prepared")):
        sys.exit("no prepared model in var/models: run `make up` (or the integration tests) once first")
    with tempfile.TemporaryDirectory(prefix="bench-media-") as folder:
        work = Path(folder)
        env_cli = [sys.executable, "-m", "appliance.cli", "media"]
        subprocess.run([*env_cli, "keygen", "--out", str(work / "keys")], check=True, capture_output=True)
        started = time.perf_counter()
        built = subprocess.run(
            [
                *env_cli,
                "build",
                "--out",
                str(work / "media"),
                "--signing-key",
                str(work / "keys/media-signing-key.pem"),
            ],
            check=True,
            capture_output=True,
            text=True,
            env={"APPLIANCE_MODELS_CACHE_DIR": str(models), "PATH": "/usr/bin:/bin"},
        )
        build_s = time.perf_counter() - started
        summary = json.loads(built.stdout)
        gib = summary["bytes"] / 2**30
        files = sorted(p for p in (work / "media").rglob("*") if p.is_file())
        started = time.perf_counter()
        for path in files:
            sha256_file(path)
        read_s = time.perf_counter() - started
        verify_s = []
        for _ in range(3):
            started = time.perf_counter()
            verify_media(work / "media", work / "keys/media-signing-key.pub.pem")
            verify_s.append(time.perf_counter() - started)
        print(f"media: {summary['files']} files, {gib:.2f} GiB, models {', '.join(summary['models'])}")
        print(f"  build (own wheel, models, playbooks, sign): {build_s:6.1f} s")
        print(f"  hash every file once (baseline):           {read_s:6.2f} s")
        print(f"  verify (signature, sizes, hashes, extras): {min(verify_s):6.2f} s best of 3  "
              f"({min(verify_s) / read_s:.2f}x the baseline, {gib / min(verify_s):.2f} GiB/s)")  # fmt: skip
    converge()


def converge() -> None:
    rootfs = Path("/var/tmp/appliance-provisioning-test/bookworm-rootfs.tar")
    if os.geteuid() != 0 or not rootfs.exists():
        print("  converge: skipped (needs root and the rootfs cached by tests/provisioning)")
        return
    with tempfile.TemporaryDirectory(prefix="bench-converge-", dir="/var/tmp") as folder:
        work = Path(folder)
        cli = [sys.executable, "-m", "appliance.cli"]
        subprocess.run([*cli, "media", "keygen", "--out", str(work / "keys")], check=True, capture_output=True)
        started = time.perf_counter()
        subprocess.run(
            [*cli, "media", "build", "--out", str(work / "media"), "--download", "appliance", "--model", "minilm-l6-v2",
             "--signing-key", str(work / "keys/media-signing-key.pem")],
            check=True, capture_output=True, env=dict(os.environ, APPLIANCE_MODELS_CACHE_DIR=str(ROOT / "var/models")),
        )  # fmt: skip
        print(f"  build with the appliance's dependencies downloaded: {time.perf_counter() - started:6.1f} s")
        root = work / "node"
        root.mkdir()
        subprocess.run(["tar", "-C", str(root), "-xf", str(rootfs)], check=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        try:
            inventory = work / "inventory.yml"
            inventory.write_text(json.dumps({"appliance": {
                "hosts": {"node1": {"ansible_host": str(root), "ansible_connection": "community.general.chroot",
                                    "ansible_python_interpreter": "/usr/bin/python3", "ansible_become": False}},
                "vars": {"appliance_subnet": "10.20.0.0/24", "appliance_start_services": False,
                         "preflight_min_memory_mb": 1024, "preflight_min_disk_gb": 1, "vllm_packages": [],
                         "vllm_models": [{"name": "minilm-l6-v2", "port": 8102, "runner": "pooling"}]}}}))  # fmt: skip
            for label in ("first converge", "second converge (no change)"):
                started = time.perf_counter()
                result = subprocess.run(
                    ["unshare", "--net", "--", *cli, "install", "--media", str(work / "media"), "-i", str(inventory),
                     "--pubkey", str(work / "keys/media-signing-key.pub.pem"), "--json"],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                recap = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"  {label + ':':<44} {time.perf_counter() - started:6.1f} s  changed {recap['changed']}")
        finally:
            subprocess.run(["umount", str(root / "proc")], check=False)


if __name__ == "__main__":
    main()

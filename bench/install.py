"""Install media: how long building and verifying take, and what verification costs per GiB.

Builds media with the appliance's wheel (built here), the bundled models prepared in var/models, and the
playbooks, signs it with a fresh key, verifies it three times and prints the times. The baseline, measured
in the same run, is reading every file once (sha256 of the same bytes): verification should cost little more.

The playbook converge step (`appliance install`) is not built yet (issue 7), so it is not timed here.

Usage: .venv/bin/python bench/install.py
"""

from __future__ import annotations

import json
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
        print("  converge (appliance install): not built yet")


if __name__ == "__main__":
    main()

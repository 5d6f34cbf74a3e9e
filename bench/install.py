"""The install, timed end to end on a booted node: media build, first converge with services starting, time from
the start of the install to the first answered chat completion, second converge (changed=0), reboot to healthy.

Uses the node harness of the tests (tests/node/nodelib.py): a Debian 12 root (debootstrap, cached), booted with
systemd as PID 1 under systemd-nspawn with one link to the host; `appliance install` converges it from signed
media inside a network namespace with no network. Also reports what verifying the media costs against hashing
every file once (the baseline, same run).

Usage (root, with systemd-container, strace and debootstrap installed): .venv/bin/python bench/install.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.media.bundle import sha256_file, verify_media  # noqa: E402
from tests.node import nodelib  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-install-", dir="/var/tmp") as folder:
        work = Path(folder)
        started = time.monotonic()
        media, pubkey, build_s = nodelib.build_media(work)
        setup_s = time.monotonic() - started  # with the wheelhouse download and model preparation when not cached
        files = sorted(p for p in media.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files) / 2**30
        started = time.monotonic()
        for path in files:
            sha256_file(path)
        read_s = time.monotonic() - started
        started = time.monotonic()
        verify_media(media, pubkey)
        verify_s = time.monotonic() - started
        print(f"media: {len(files)} files, {size:.2f} GiB")
        print(f"  build (copy and sign; cached wheelhouse and models): {build_s:7.1f} s  ({setup_s:.0f} s with setup)")
        print(f"  verify: {verify_s:.1f} s against {read_s:.1f} s to hash every file once ({verify_s / read_s:.2f}x)")

        node = nodelib.Node(work / "node", work / "logs")
        node.create(nodelib.rootfs_tarball())
        try:
            boot_s = node.boot()
            print(f"node: booted in {boot_s:.1f} s")
            cafile = work / "client" / "node-ca.crt"
            first_chat: list[float] = []
            install_started = time.monotonic()

            def chat_when_ready() -> None:
                # The CA and the key exist only once the install made them; poll until the chat answers.
                while (
                    not (node.root / "etc/appliance/pki/ca.crt").exists()
                    or not (node.root / "var/lib/appliance/secrets").exists()
                ):
                    time.sleep(2)
                key = ""
                while time.monotonic() - install_started < 2400:
                    try:
                        if not key:
                            nodelib.node_ca(node, cafile.parent)
                            key = nodelib.create_key(node)
                        nodelib.first_chat(cafile, key, deadline_s=2400)
                        first_chat.append(time.monotonic() - install_started)
                        return
                    except Exception:  # not installed far enough yet: try again
                        time.sleep(3)

            watcher = threading.Thread(target=chat_when_ready, daemon=True)
            watcher.start()
            first = node.install(media, pubkey, work / "install-1")
            print(f"  first converge (services started, healthy): {first.seconds:7.1f} s  changed {first.changed}"
                  f"  {'ok' if first.ok else 'FAILED'}")  # fmt: skip
            watcher.join(timeout=600)
            answered = f"{first_chat[0]:7.1f} s" if first_chat else "no answer"
            print(f"  start of install to first chat completion:  {answered}")
            second = node.install(media, pubkey, work / "install-2")
            print(f"  second converge:                            {second.seconds:7.1f} s  changed {second.changed}")
            off_s = node.poweroff()
            started = time.monotonic()
            node.boot()
            status = node.cli("status", "--json", "--wait", "900", timeout=960)
            healthy_s = time.monotonic() - started
            print(f"  reboot: shutdown {off_s:.1f} s, boot to healthy {healthy_s:7.1f} s"
                  f"  {'healthy' if status.returncode == 0 else 'NOT healthy'}")  # fmt: skip
        finally:
            node.destroy()
            shutil.rmtree(node.root, ignore_errors=True)


if __name__ == "__main__":
    main()

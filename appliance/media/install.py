"""``appliance install``: verify the media, then converge the node with its playbooks through ansible-runner.

Nothing is touched before the media's signature and every file are checked. The run streams Ansible's own
output; its result is the play recap per host (ok, changed, failed, unreachable).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.media.bundle import MediaError, verify_media


def install(
    media: Path,
    inventory: Path,
    pubkey: Path,
    extra_vars: dict[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[int, dict[str, Any]]:
    """(exit status, recap). The media is verified first; a refusal raises :class:`MediaError`."""
    import ansible_runner  # type: ignore[import-untyped]

    media = media.resolve()
    manifest = verify_media(media, pubkey)
    echo(f"media verified: {len(manifest['files'])} files, appliance {manifest['appliance_version']}")
    playbook = media / "playbooks" / "site.yml"
    if not playbook.is_file():
        raise MediaError(f"{playbook} is missing from the media")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_ROLES_PATH": str(media / "playbooks" / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_GALAXY_DISABLE_GPG_VERIFY": "1",
    }

    def event_handler(event: dict[str, Any]) -> bool:
        text = event.get("stdout")
        if text:
            echo(text)
        return True

    with tempfile.TemporaryDirectory(prefix="appliance-install-") as private:
        result = ansible_runner.run(
            private_data_dir=private,
            playbook=str(playbook),
            inventory=str(inventory.resolve()),
            extravars={"appliance_media_dir": str(media), **(extra_vars or {})},
            envvars=env,
            event_handler=event_handler,
            quiet=True,
        )
        stats = dict(result.stats or {})
    recap = {key: dict(stats.get(key) or {}) for key in ("ok", "changed", "failures", "dark", "skipped", "processed")}
    return int(result.rc), recap

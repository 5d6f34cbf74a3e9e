"""What an install leaves in the node's own audit trail: which media it was, and which version it replaced.

The playbooks run ``appliance node record-install`` as the appliance role's last task. A converge with the same
media records nothing (so a second converge changes nothing); other media records ``node.upgraded`` (or
``node.installed`` on a node with no record yet), naming the version it replaced.
"""

from __future__ import annotations

import json
import os
import pwd
from typing import Any

from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent
from appliance.settings import Settings

EVENTS = ("node.installed", "node.upgraded")


def record_install(settings: Settings, version: str, manifest_sha256: str) -> dict[str, Any]:
    """Append the install's audit record unless this media is already the last one recorded."""
    store = audit_store(settings)
    last: dict[str, Any] | None = None
    for event_type in EVENTS:
        rows = store.search(event_type=event_type, limit=1)["data"]
        if rows and (last is None or rows[0]["seq"] > last["seq"]):
            last = rows[0]
    previous = (last or {}).get("detail") or {}
    if isinstance(previous, str):  # a JSON column read back as text on some databases
        previous = json.loads(previous)
    if previous.get("version") == version and previous.get("manifest_sha256") == manifest_sha256:
        return {"changed": False, "event": None, "version": version}
    event_type = "node.installed" if last is None else "node.upgraded"
    detail = {"version": version, "manifest_sha256": manifest_sha256, "previous_version": previous.get("version")}
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    store.append(
        [AuditEvent(event_type, "success", component="installer", subject=user, subject_kind="os_user", detail=detail)]
    )
    store.checkpoint()
    return {"changed": True, "event": event_type, **detail}

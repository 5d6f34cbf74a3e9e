"""``appliance node record-install``: the node's own audit trail says which media was installed and what it
replaced; the same media twice records nothing (a second converge changes nothing)."""

from pathlib import Path

from appliance.audit.setup import audit_store
from appliance.media.node import record_install
from appliance.settings import Settings


def test_install_then_same_media_then_newer_media(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = record_install(settings, "0.4.0", "a" * 64)
    assert first["changed"] and first["event"] == "node.installed" and first["previous_version"] is None
    assert record_install(settings, "0.4.0", "a" * 64) == {"changed": False, "event": None, "version": "0.4.0"}
    upgrade = record_install(settings, "0.5.0", "b" * 64)
    assert upgrade["event"] == "node.upgraded" and upgrade["previous_version"] == "0.4.0"
    # Media rebuilt with the same version but other files is another install too.
    assert record_install(settings, "0.5.0", "c" * 64)["event"] == "node.upgraded"
    store = audit_store(settings)
    assert store.verify().ok
    rows = store.search(event_type="node.upgraded")["data"]
    assert [row["detail"]["manifest_sha256"] for row in rows] == ["c" * 64, "b" * 64]
    assert rows[0]["component"] == "installer" and rows[0]["subject_kind"] == "os_user"

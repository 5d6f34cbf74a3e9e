"""Backup on one node, restore on a freshly installed one (SQLite and Qdrant local mode), through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from appliance.audit.setup import audit_store
from appliance.audit.store import AuditEvent
from appliance.backup.create import create_backup
from appliance.backup.layout import Layout
from appliance.backup.restore import restore_backup
from appliance.lib.errors import AuthenticationError
from appliance.lib.progress import Progress
from appliance.retrieval.vectors import VectorStore, point_id
from appliance.settings import Settings
from tests.unit.backup.conftest import PASSPHRASE, add_collection, key_tenant, populate, tenant_names, unit

REPO = Path(__file__).resolve().parents[3]


def cli(
    data_dir: Path, *args: str, config: Path | None = None, passphrase: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ["PATH"],
        "APPLIANCE_DATA_DIR": str(data_dir),
        "APPLIANCE_CONFIG": str(config or data_dir.parent / "no-config.toml"),
    }
    if passphrase is not None:
        env["APPLIANCE_BACKUP_PASSPHRASE"] = passphrase
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=300
    )


async def test_keys_chain_and_collections_work_on_a_fresh_node_after_restore(tmp_path: Path) -> None:
    old = populate(Settings(data_dir=tmp_path / "old"), tenant="acme")
    await add_collection(old.settings)
    config = tmp_path / "etc" / "appliance.toml"
    config.parent.mkdir()
    config.write_text(f'data_dir = "{tmp_path / "old"}"\n', encoding="utf-8")
    (config.parent / "database.env").write_text("APPLIANCE_DATABASE__ECHO=false\n", encoding="utf-8")

    made = cli(tmp_path / "old", "backup", "--out", str(tmp_path / "node.backup"), "--json", config=config,
               passphrase=PASSPHRASE.decode())  # fmt: skip
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["schema_revision"] and summary["database"] == "sqlite" and summary["vector_store"]["included"]
    assert "database (sqlite): done (1 file" in made.stderr, "progress goes to standard error, a line per stage"
    backup = tmp_path / "node.backup"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert b"acme" not in backup.read_bytes() and b"BEGIN PRIVATE KEY" not in backup.read_bytes(), "encrypted"

    # A freshly installed node: its own database, pepper, audit key and (empty) vector store.
    fresh = populate(Settings(data_dir=tmp_path / "fresh"), tenant="newco")
    passphrase_file = tmp_path / "passphrase"
    passphrase_file.write_bytes(PASSPHRASE + b"\n")
    restored = cli(tmp_path / "fresh", "restore", str(backup), "--passphrase-file", str(passphrase_file), "--json")
    assert restored.returncode == 0, restored.stderr
    result = json.loads(restored.stdout)
    assert {item["part"] for item in result["restored"]} == {"secrets", "audit", "database", "qdrant"}
    assert result["skipped"] == [{"part": "config", "why": "kept this node's configuration (give --restore-config)"}]

    settings = fresh.settings
    assert tenant_names(settings) == ["acme"]
    assert await key_tenant(settings, old.api_key) is not None, "the old key works with the restored pepper"
    try:
        await key_tenant(settings, fresh.api_key)
        raise AssertionError("the fresh node's own key is gone with its database")
    except AuthenticationError:
        pass
    verified = audit_store(settings).verify()
    assert verified.ok and verified.records == old.audit_records, verified
    assert cli(tmp_path / "fresh", "audit", "verify").returncode == 0
    store = VectorStore(path=settings.data_dir / "qdrant")
    hits = await store.search("docs", unit(1), 1)
    store.close()
    assert hits[0].payload == {"document_id": "doc", "chunk_index": 1}
    secrets_dir = settings.secrets_dir
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets_dir.iterdir())
    assert not list(settings.data_dir.glob(".restore-*")) and not list(settings.data_dir.glob(".*pre-restore*"))


def test_restore_config_puts_the_configuration_files_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "appliance.toml").write_text("[server]\nport = 9443\n", encoding="utf-8")
    (etc / "database.env").write_text("APPLIANCE_DATABASE__ECHO=false\n", encoding="utf-8")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(etc / "appliance.toml"))
    node = populate(Settings(data_dir=tmp_path / "data"))
    create_backup(Layout.of(node.settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    (etc / "appliance.toml").write_text("[server]\nport = 1\n", encoding="utf-8")
    (etc / "database.env").unlink()

    kept = restore_backup(Layout.of(node.settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    assert (etc / "appliance.toml").read_text() == "[server]\nport = 1\n" and "config" in str(kept["skipped"])
    restore_backup(Layout.of(node.settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False), restore_config=True)
    assert (etc / "appliance.toml").read_text() == "[server]\nport = 9443\n"
    assert (etc / "database.env").read_text() == "APPLIANCE_DATABASE__ECHO=false\n"


def test_a_backup_taken_while_the_chain_grows_restores_a_chain_that_verifies(tmp_path: Path) -> None:
    """The gateway keeps writing (and checkpointing) during the backup: the copy is still consistent."""
    settings = Settings(data_dir=tmp_path / "live", audit={"checkpoint_every": 3})
    node = populate(settings)
    store = audit_store(settings)
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            store.append([AuditEvent("gateway.chat", "success", detail={"n": n})])
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for attempt in range(3):
            create_backup(Layout.of(settings), tmp_path / f"b{attempt}", PASSPHRASE, Progress(enabled=False))
    finally:
        stop.set()
        writer.join()
    for attempt in range(3):
        target = Settings(data_dir=tmp_path / f"restored{attempt}")
        restore_backup(Layout.of(target), tmp_path / f"b{attempt}", PASSPHRASE, Progress(enabled=False))
        result = audit_store(target).verify()
        assert result.ok and result.records > node.audit_records, result


def test_an_older_schema_is_restored_and_migrated_when_the_appliance_starts(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import text

    from appliance.backup.database import known_revisions
    from appliance.db.engine import alembic_config, create_schema, make_engine

    old = Settings(data_dir=tmp_path / "old")
    engine = make_engine(old.database_url)
    with engine.connect() as connection:
        command.upgrade(alembic_config(connection), "0007")
        connection.commit()
    engine.dispose()
    create_backup(Layout.of(old), tmp_path / "b", PASSPHRASE, Progress(enabled=False))

    node = populate(Settings(data_dir=tmp_path / "node"))
    asyncio.run(add_collection(node.settings))
    result = restore_backup(Layout.of(node.settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    assert result["schema_revision"] == "0007" and result["migrates_on_next_start"] is True
    # The backed-up node had no secrets, audit files or collections yet: this node's own are gone too.
    assert {item["part"] for item in result["removed"]} == {"secrets", "audit", "qdrant"}
    assert not node.settings.secrets_dir.exists() and not (node.settings.data_dir / "audit").exists()
    engine = make_engine(node.settings.database_url)
    create_schema(engine)  # what the gateway does when it starts
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == known_revisions()[0]
    engine.dispose()


async def test_a_backup_while_the_gateway_holds_the_vector_store_and_a_check_that_changes_nothing(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "node")
    populate(settings)
    store = VectorStore(path=settings.data_dir / "qdrant")  # open and locked, as in a running gateway
    await store.create("live", 8)
    await store.upsert("live", [point_id("d", 0)], [unit(3)], [{"document_id": "d"}])
    try:
        create_backup(Layout.of(settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    finally:
        store.close()
    target = Settings(data_dir=tmp_path / "fresh")
    target.data_dir.mkdir()
    checked = cli(target.data_dir, "restore", str(tmp_path / "b"), "--verify-only", passphrase=PASSPHRASE.decode())
    assert checked.returncode == 0 and "backup OK" in checked.stdout, checked.stderr
    assert list(target.data_dir.iterdir()) == []
    restore_backup(Layout.of(target), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    restored = VectorStore(path=target.data_dir / "qdrant")
    assert (await restored.search("live", unit(3), 1))[0].payload == {"document_id": "d"}
    restored.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files to another user")
def test_as_root_the_restored_files_belong_to_the_data_directorys_owner(tmp_path: Path) -> None:
    node = populate(Settings(data_dir=tmp_path / "old"))
    create_backup(Layout.of(node.settings), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    target = Settings(data_dir=tmp_path / "node")
    target.data_dir.mkdir()
    os.chown(target.data_dir, 4321, 4321)
    restore_backup(Layout.of(target), tmp_path / "b", PASSPHRASE, Progress(enabled=False))
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in target.data_dir.rglob("*")}
    assert owners == {(4321, 4321)}
    assert stat.S_IMODE((target.secrets_dir / "api-key-pepper").stat().st_mode) == 0o600

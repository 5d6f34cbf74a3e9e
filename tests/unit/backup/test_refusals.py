"""Every refusal names its reason and leaves the node exactly as it was; a failure half-way rolls back."""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.backup.create import BackupError, create_backup
from appliance.backup.layout import Layout, running_reason
from appliance.backup.restore import RestoreError, restore_backup
from appliance.engines.state import ApplianceState, write_state
from appliance.lib.progress import Progress
from appliance.retrieval.vectors import VectorStore
from appliance.settings import Settings
from tests.unit.backup.conftest import PASSPHRASE, add_collection, disk_state, key_tenant, populate

REPO = Path(__file__).resolve().parents[3]
QUIET = Progress(enabled=False)


@pytest.fixture
async def backup(tmp_path: Path) -> Path:
    node = populate(Settings(data_dir=tmp_path / "old"), tenant="acme")
    await add_collection(node.settings)
    out = tmp_path / "node.backup"
    create_backup(Layout.of(node.settings), out, PASSPHRASE, QUIET, frame_size=64 * 1024)
    return out


@pytest.fixture
async def target(tmp_path: Path) -> Settings:
    """The node restored onto: in use, with its own data, and its vector store in a folder of its own."""
    settings = Settings(data_dir=tmp_path / "node", retrieval={"qdrant_path": tmp_path / "vectors" / "qdrant"})
    populate(settings, tenant="current")
    await add_collection(settings, "current-docs")
    return settings


def roots(settings: Settings) -> tuple[Path, Path]:
    assert settings.retrieval.qdrant_path is not None
    return settings.data_dir, settings.retrieval.qdrant_path.parent


def refused(settings: Settings, backup: Path, passphrase: bytes = PASSPHRASE) -> str:
    before = disk_state(*roots(settings))
    with pytest.raises(RestoreError) as caught:
        restore_backup(Layout.of(settings), backup, passphrase, QUIET)
    assert disk_state(*roots(settings)) == before, "a refused restore changes nothing on disk"
    return str(caught.value)


def frame_offsets(backup: Path) -> list[int]:
    """Where each frame starts (after the plain header)."""
    data = backup.read_bytes()
    offset = 8 + 4 + struct.unpack(">I", data[8:12])[0]
    starts = []
    while offset < len(data):
        starts.append(offset)
        offset += 4 + struct.unpack(">I", data[offset : offset + 4])[0]
    return starts


def test_a_wrong_passphrase_is_refused(backup: Path, target: Settings) -> None:
    assert "wrong passphrase" in refused(target, backup, b"not the passphrase")


def test_a_flipped_byte_is_refused(backup: Path, target: Settings) -> None:
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0x01
    backup.write_bytes(bytes(data))
    assert "fails authentication: the file is damaged or altered" in refused(target, backup)


def test_an_edited_header_is_refused(backup: Path, target: Settings) -> None:
    data = backup.read_bytes()
    backup.write_bytes(data.replace(b'"frame_size": 65536', b'"frame_size": 65537', 1))
    assert "frame 0 of the backup fails authentication" in refused(target, backup), "the header is in every AAD"


def test_a_truncated_file_is_refused(backup: Path, target: Settings) -> None:
    starts = frame_offsets(backup)
    assert len(starts) >= 2, "the test backup spans several frames"
    whole = backup.read_bytes()
    backup.write_bytes(whole[: starts[-1]])  # the last frame dropped whole: only the missing final flag tells
    assert "cut short: it ends after frame" in refused(target, backup)
    backup.write_bytes(whole[: starts[-1] + 10])
    assert "cut short inside frame" in refused(target, backup)
    backup.write_bytes(whole + b"\0")
    assert "bytes after its last frame" in refused(target, backup)


def test_a_backup_of_a_newer_schema_is_refused(tmp_path: Path, target: Settings) -> None:
    newer = populate(Settings(data_dir=tmp_path / "newer"))
    with sqlite3.connect(newer.settings.data_dir / "appliance.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    create_backup(Layout.of(newer.settings), tmp_path / "newer.backup", PASSPHRASE, QUIET)
    message = refused(target, tmp_path / "newer.backup")
    assert "schema revision 9999_from_the_future is newer than this appliance knows" in message


def test_a_backup_of_another_database_kind_is_refused(backup: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "pg-node", database={"url": "postgresql://appliance@/appliance"})
    with pytest.raises(RestoreError, match="holds a sqlite database and this node is configured for postgresql"):
        restore_backup(Layout.of(settings), backup, PASSPHRASE, QUIET)
    assert not (tmp_path / "pg-node").exists(), "the data directory made to stage into is not left behind"


async def test_a_restore_while_the_appliance_runs_is_refused(backup: Path, target: Settings) -> None:
    write_state(target.run_dir, ApplianceState(supervisor_pid=os.getpid(), data_dir=str(target.data_dir),
                                               phase="running"))  # fmt: skip
    before = disk_state(*roots(target))
    env = {
        "PATH": os.environ["PATH"],
        "APPLIANCE_DATA_DIR": str(target.data_dir),
        "APPLIANCE_RETRIEVAL__QDRANT_PATH": str(target.retrieval.qdrant_path),
        "APPLIANCE_CONFIG": os.environ["APPLIANCE_CONFIG"],
        "APPLIANCE_BACKUP_PASSPHRASE": PASSPHRASE.decode(),
    }
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "restore", str(backup)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    assert f"the appliance is running (supervisor pid {os.getpid()})" in result.stderr
    assert disk_state(*roots(target)) == before
    (target.run_dir / "state.json").unlink()

    # A gateway started some other way (a systemd unit) still holds the vector store's lock: refused too.
    assert target.retrieval.qdrant_path is not None
    store = VectorStore(path=target.retrieval.qdrant_path)
    await store.count("current-docs")
    try:
        reason = running_reason(target, Layout.of(target))
    finally:
        store.close()
    assert reason is not None and "another process has the vector store open" in reason
    assert running_reason(target, Layout.of(target)) is None


def test_no_passphrase_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "APPLIANCE_DATA_DIR": str(tmp_path), "APPLIANCE_CONFIG": str(tmp_path / "x")}
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "backup", "--out", str(tmp_path / "b")], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "give --passphrase-file FILE or set APPLIANCE_BACKUP_PASSPHRASE" in result.stderr
    assert not (tmp_path / "b").exists()


async def test_a_failure_half_way_puts_every_part_back(backup: Path, target: Settings) -> None:
    """The vector store's folder cannot be changed (immutable for root, read-only otherwise): the secrets, audit
    files and database, already swapped by then, go back to what they were."""
    vectors = roots(target)[1]
    before = disk_state(*roots(target))
    lock = ["chattr", "+i", str(vectors)] if os.geteuid() == 0 else None
    if lock is not None:
        subprocess.run(lock, check=True)
    else:
        vectors.chmod(0o555)
    try:
        with pytest.raises(RestoreError) as caught:
            restore_backup(Layout.of(target), backup, PASSPHRASE, QUIET)
    finally:
        if lock is not None:
            subprocess.run(["chattr", "-i", str(vectors)], check=True)
        else:
            vectors.chmod(0o755)
    assert f"restoring {vectors / 'qdrant'} failed" in str(caught.value)
    assert "everything was put back as it was" in str(caught.value)
    assert disk_state(*roots(target)) == before
    assert not list(target.data_dir.glob(".restore-*"))
    assert await key_tenant(target, populate_key(target)) is not None


def populate_key(settings: Settings) -> str:
    """(Only to show the node still works: make a key with the rolled-back pepper and database.)"""
    from sqlmodel import Session, select

    from appliance.db.engine import make_engine
    from appliance.identity import service
    from appliance.identity.models import Workflow
    from appliance.identity.schemas import ApiKeyCreate
    from appliance.identity.setup import key_hasher
    from tests.unit.backup.conftest import ADMIN

    engine = make_engine(settings.database_url)
    with Session(engine) as session:
        workflow = session.exec(select(Workflow)).one()
        _record, key = service.create_api_key(
            session, ADMIN, key_hasher(settings), ApiKeyCreate(workflow_id=workflow.id)
        )
    engine.dispose()
    return key


def test_a_failed_backup_leaves_no_file_and_keeps_the_previous_one(tmp_path: Path) -> None:
    node = populate(Settings(data_dir=tmp_path / "node"))
    out = tmp_path / "out" / "node.backup"
    out.parent.mkdir()
    out.write_bytes(b"yesterday's backup")
    (tmp_path / "node" / "appliance.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        create_backup(Layout.of(node.settings), out, PASSPHRASE, QUIET)
    assert [p.name for p in out.parent.iterdir()] == ["node.backup"]
    assert out.read_bytes() == b"yesterday's backup"
    shutil.rmtree(tmp_path / "node")
    with pytest.raises(BackupError, match="does not exist: nothing to back up"):
        create_backup(Layout.of(node.settings), out, PASSPHRASE, QUIET)
    assert [p.name for p in out.parent.iterdir()] == ["node.backup"]


def test_on_a_systemd_node_an_active_appliance_service_refuses_the_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAKE systemctl: no systemd runs as PID 1 here, so the one answer needed (`is-active appliance` says
    active) comes from a stand-in script; the booted-node test covers the real one."""
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "is-active --quiet appliance" ] && exit "${ACTIVE:-0}"\nexit 4\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    settings = Settings(data_dir=tmp_path / "node", server={"service_manager": "systemd"})
    reason = running_reason(settings, Layout.of(settings))
    assert reason == "the appliance service is active; stop it with `systemctl stop appliance`"
    monkeypatch.setenv("ACTIVE", "3")
    assert running_reason(settings, Layout.of(settings)) is None

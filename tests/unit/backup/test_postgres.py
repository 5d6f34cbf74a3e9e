"""Backup and restore with a real PostgreSQL server: pg_dump, then psql in one transaction."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest

from appliance.audit.setup import audit_store
from appliance.backup.create import create_backup
from appliance.backup.layout import Layout
from appliance.backup.restore import RestoreError, restore_backup
from appliance.lib.progress import Progress
from appliance.retrieval.vectors import VectorStore
from appliance.settings import Settings
from tests.support.postgres import PostgresServer
from tests.unit.backup.conftest import (
    PASSPHRASE,
    add_collection,
    disk_state,
    key_tenant,
    populate,
    tenant_names,
    unit,
)

QUIET = Progress(enabled=False)


def pg_node(root: Path, url: str) -> Settings:
    return Settings(data_dir=root, database={"url": url})


async def test_a_postgresql_node_restores_onto_a_used_and_onto_an_empty_database(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    old = populate(pg_node(tmp_path / "old", postgres.create_database("backup_alpha")), tenant="acme")
    await add_collection(old.settings)
    as_postgres = os.geteuid() == 0  # root runs the tools as the data directory's owner (peer authentication)
    if as_postgres:
        shutil.chown(old.settings.data_dir, "postgres")
        assert Layout.of(old.settings).database_user == "postgres"
    summary = create_backup(Layout.of(old.settings), tmp_path / "pg.backup", PASSPHRASE, QUIET)
    assert summary["database"] == "postgresql" and summary["schema_revision"]

    for name, used in (("backup_beta", True), ("backup_gamma", False)):
        settings = pg_node(tmp_path / name, postgres.create_database(name))
        if used:
            populate(settings, tenant="current", records=50)  # more records than the backup: all must go
        elif as_postgres:
            settings.data_dir.mkdir()
            shutil.chown(settings.data_dir, "postgres")
        result = restore_backup(Layout.of(settings), tmp_path / "pg.backup", PASSPHRASE, QUIET)
        assert "database" in {item["part"] for item in result["restored"]}
        assert tenant_names(settings) == ["acme"]
        assert await key_tenant(settings, old.api_key) is not None
        verified = audit_store(settings).verify()
        assert verified.ok and verified.records == old.audit_records, verified
        store = VectorStore(path=settings.data_dir / "qdrant")
        assert (await store.search("docs", unit(2), 1))[0].payload["chunk_index"] == 2
        store.close()


def test_a_database_that_refuses_the_restore_puts_the_files_back(tmp_path: Path, postgres: PostgresServer) -> None:
    """The node's database role may not drop the tables (they belong to another role): psql fails inside its
    transaction, so the database is untouched, and the files already swapped go back."""
    old = populate(pg_node(tmp_path / "old", postgres.create_database("backup_delta")), tenant="acme")
    create_backup(Layout.of(old.settings), tmp_path / "pg.backup", PASSPHRASE, QUIET)

    owner_url = postgres.create_database("backup_epsilon")
    populate(pg_node(tmp_path / "node", owner_url), tenant="current")
    with psycopg.connect(f"host=127.0.0.1 port={postgres.port} user=postgres dbname=postgres", autocommit=True) as db:
        db.execute("CREATE ROLE backup_limited LOGIN")
    limited = pg_node(tmp_path / "node", owner_url.replace("postgres@", "backup_limited@"))
    before = disk_state(limited.data_dir)
    with pytest.raises(RestoreError) as caught:
        restore_backup(Layout.of(limited), tmp_path / "pg.backup", PASSPHRASE, QUIET)
    message = str(caught.value)
    assert "restoring the database" in message and "the files were put back as they were" in message
    assert "must be owner" in message, message
    assert disk_state(limited.data_dir) == before
    assert tenant_names(pg_node(tmp_path / "node", owner_url)) == ["current"]

"""The database in a backup: a consistent snapshot while the gateway runs, its schema revision, and putting it
back. SQLite: the online backup API into a file. PostgreSQL: ``pg_dump`` (plain SQL, no owner, no privileges)
and ``psql`` in one transaction that first empties the schema, so a failed restore leaves the database as it was.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
from functools import lru_cache
from pathlib import Path

from sqlalchemy.engine import URL

from appliance.db.engine import MIGRATIONS


class DatabaseError(Exception):
    """A dump or a restore of the database failed (the message says which tool and why)."""


@lru_cache(maxsize=1)
def known_revisions() -> tuple[str, frozenset[str]]:
    """This appliance's newest schema revision and every revision it knows."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    assert head is not None
    return head, frozenset(revision.revision for revision in script.walk_revisions())


# -- SQLite ------------------------------------------------------------------------------------------------


def sqlite_snapshot(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (WAL and all), page by page, without blocking writers long."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst, pages=4096)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file; the appliance sets WAL again
        finally:
            dst.close()
    finally:
        src.close()


def sqlite_revision(path: Path) -> str | None:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError:
            return None
    return str(row[0]) if row else None


def is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def sqlite_check(path: Path) -> None:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        result = db.execute("PRAGMA quick_check").fetchone()
    if not result or result[0] != "ok":
        raise DatabaseError(f"the database in the backup fails SQLite's integrity check: {result}")


# -- PostgreSQL --------------------------------------------------------------------------------------------


def libpq_env(url: URL) -> dict[str, str]:
    """libpq's environment for ``url`` (the password stays out of every command line and message)."""
    env = dict(os.environ)
    query = {key: value if isinstance(value, str) else value[0] for key, value in url.query.items()}
    pairs = {
        "PGHOST": query.get("host") or url.host,
        "PGPORT": str(url.port) if url.port else query.get("port"),
        "PGUSER": url.username or query.get("user"),
        "PGPASSWORD": url.password if isinstance(url.password, str) else None,
        "PGDATABASE": url.database,
        "PGSSLMODE": query.get("sslmode"),
    }
    env.update({key: value for key, value in pairs.items() if value})
    return env


def _tool(name: str, env: dict[str, str]) -> str:
    """The PostgreSQL client tool of the server's major version where installed (a newer ``pg_dump`` writes SQL
    an older server refuses), else the newest one there is."""
    major = _server_major(env)
    versioned = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    for path in versioned:
        if major is not None and int(Path(path).parts[-3]) == major:
            return path
    newer = [p for p in versioned if major is None or int(Path(p).parts[-3]) >= major]
    found = newer[-1] if newer else shutil.which(name)
    if not found:
        raise DatabaseError(f"`{name}` is not installed (Debian package postgresql-client)")
    return found


def _server_major(env: dict[str, str]) -> int | None:
    psql = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))), None)
    if psql is None:
        return None
    result = subprocess.run(
        [psql, "-XAtqc", "SHOW server_version_num"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    return int(result.stdout.strip()) // 10000 if result.returncode == 0 and result.stdout.strip() else None


def _run(command: list[str], env: dict[str, str], what: str, timeout_s: float = 6 * 3600) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise DatabaseError(f"{what} failed ({Path(command[0]).name} exit {result.returncode}): " + " | ".join(detail))
    return result.stdout


def postgres_dump(url: URL, target: Path) -> str | None:
    """Dump the database into ``target`` (plain SQL); returns its schema revision (read in the dump's snapshot
    would need a second session on the same snapshot; read just before, which migrations at start cannot race
    while the appliance runs, since it migrated when it started)."""
    env = libpq_env(url)
    revision = _run(
        [_tool("psql", env), "-XAtq", "-c", "SELECT version_num FROM alembic_version"],
        env,
        "reading the schema revision",
    ).strip()
    _run(
        [_tool("pg_dump", env), "--format=plain", "--no-owner", "--no-privileges", "--file", str(target)],
        env,
        "pg_dump",
    )
    return revision or None


_EMPTY_SCHEMA = """
DO $$
DECLARE item record;
BEGIN
  FOR item IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f') LOOP
    EXECUTE format('DROP TABLE IF EXISTS public.%I CASCADE', item.relname);
  END LOOP;
  FOR item IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind = 'S' LOOP
    EXECUTE format('DROP SEQUENCE IF EXISTS public.%I CASCADE', item.relname);
  END LOOP;
  FOR item IN SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c')
                AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid) LOOP
    EXECUTE format('DROP TYPE IF EXISTS public.%I CASCADE', item.typname);
  END LOOP;
END $$;
"""


def postgres_restore(url: URL, dump: Path, scratch: Path) -> None:
    """Replace the database's tables with the dump's, in one transaction: all of it, or nothing changed."""
    env = libpq_env(url)
    prelude = scratch / "empty-schema.sql"
    prelude.write_text(_EMPTY_SCHEMA, encoding="utf-8")
    _run(
        [
            _tool("psql", env),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "--single-transaction",
            "-f",
            str(prelude),
            "-f",
            str(dump),
        ],
        env,
        "restoring the database (psql, one transaction: the database is unchanged)",
    )

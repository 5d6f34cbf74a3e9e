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
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

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
    """A consistent copy of a live SQLite database (WAL and all). In one step: a single read transaction sees
    one snapshot while writers go on (WAL mode); a stepwise copy would restart at every write of the gateway."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
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


class PostgresTools:
    """``psql`` and ``pg_dump`` against ``url``, as ``run_as`` when given (root on a node whose database lets
    the appliance's OS user in by peer authentication runs them as that user, through ``runuser``)."""

    def __init__(self, url: URL, run_as: str | None = None) -> None:
        self._env = libpq_env(url)
        self._prefix = ["runuser", "-u", run_as, "--"] if run_as else []
        self._major: int | None = None
        self._major_known = False

    def tool(self, name: str) -> str:
        """The client tool of the server's major version where installed (a newer ``pg_dump`` writes SQL an
        older server refuses), else the newest one there is."""
        versioned = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
        if name != "psql" and not self._major_known:
            self._major_known = True
            answer = self.run([self.tool("psql"), "-XAtqc", "SHOW server_version_num"], "asking the server's version")
            self._major = int(answer.strip()) // 10000 if answer.strip().isdigit() else None
        major = self._major
        for path in versioned:
            if major is not None and int(Path(path).parts[-3]) == major:
                return path
        newer = [p for p in versioned if major is None or int(Path(p).parts[-3]) >= major]
        found = newer[-1] if newer else shutil.which(name)
        if not found:
            raise DatabaseError(f"`{name}` is not installed (Debian package postgresql-client)")
        return found

    def run(
        self, command: list[str], what: str, *, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None
    ) -> str:
        result = subprocess.run(
            [*self._prefix, *command],
            env=self._env,
            stdin=stdin,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            timeout=6 * 3600,
            check=False,
        )
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise DatabaseError(
                f"{what} failed ({Path(command[0]).name} exit {result.returncode}): " + " | ".join(lines)
            )
        return result.stdout.decode(errors="replace") if stdout is None else ""


def postgres_dump(url: URL, target: Path, run_as: str | None = None) -> str | None:
    """Dump the database into ``target`` (plain SQL, written by this process: the tool may run as another
    user); returns its schema revision, read just before the dump (the running gateway migrated when it started,
    so the revision does not move meanwhile)."""
    tools = PostgresTools(url, run_as)
    revision = tools.run([tools.tool("psql"), "-XAtq", "-c", "SELECT version_num FROM alembic_version"],
                         "reading the schema revision").strip()  # fmt: skip
    with target.open("wb") as handle:
        tools.run([tools.tool("pg_dump"), "--format=plain", "--no-owner", "--no-privileges"], "pg_dump", stdout=handle)
    return revision or None


_EMPTY_SCHEMA = b"""
DO $$
DECLARE item record;
BEGIN
  FOR item IN SELECT c.relname, CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                                 WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
              ORDER BY c.relkind = 'S' LOOP
    EXECUTE format('DROP %s IF EXISTS public.%I CASCADE', item.kind, item.relname);
  END LOOP;
  FOR item IN SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd', 'c')
                AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid) LOOP
    EXECUTE format('DROP TYPE IF EXISTS public.%I CASCADE', item.typname);
  END LOOP;
END $$;
"""


def postgres_restore(url: URL, dump: Path, run_as: str | None = None) -> None:
    """Replace the database's tables with the dump's, in one transaction (``psql -1``, the SQL on its standard
    input: emptying the schema, then the dump): all of it, or nothing changed."""
    tools = PostgresTools(url, run_as)
    command = [tools.tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", "-"]
    with tempfile.TemporaryFile() as prelude, dump.open("rb") as body:
        # psql reads one stream: the prelude, then the dump (a pipe fed by a thread, not a copy of the dump).
        prelude.write(_EMPTY_SCHEMA)
        prelude.seek(0)
        read_end, write_end = os.pipe()
        feeder = threading.Thread(target=_feed, args=(write_end, [prelude, body]), daemon=True)
        feeder.start()
        try:
            with os.fdopen(read_end, "rb") as stdin:
                tools.run(command, "restoring the database (psql, one transaction: the database is unchanged)",
                          stdin=stdin)  # fmt: skip
        finally:
            feeder.join()


def _feed(descriptor: int, sources: list[BinaryIO]) -> None:
    try:
        with os.fdopen(descriptor, "wb") as sink:
            for source in sources:
                shutil.copyfileobj(source, sink, 1 << 20)
    except BrokenPipeError:
        pass  # psql stopped early (an error): it says why

"""Database engine and schema creation. SQLite file by default, PostgreSQL by URL."""

from __future__ import annotations

import fcntl
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlmodel import create_engine


def make_engine(url: str, *, echo: bool = False, serialized_writes: bool = False) -> Engine:
    """An engine for ``url``. ``serialized_writes``: every transaction takes the write lock when it begins
    (SQLite ``BEGIN IMMEDIATE``), for read-then-append work such as the audit chain; on PostgreSQL the
    caller locks rows with ``SELECT ... FOR UPDATE`` instead. Reads on such an engine go through
    ``reading``, which takes no lock."""
    parsed = make_url(url)
    # A server's connection can go stale (restarted, idle-timed-out): checked at each checkout. A SQLite file's
    # cannot, and the check was a statement more in every transaction of the request path.
    sqlite = parsed.get_backend_name() == "sqlite"
    kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": not sqlite}
    if sqlite:
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    elif parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        if serialized_writes:
            # pysqlite's own transaction handling would defer BEGIN; take it over (SQLAlchemy's recipe).
            event.listen(engine, "connect", _no_implicit_begin)
            event.listen(engine, "begin", _begin_serialized)
    return engine


_READS_ONLY = "appliance_reads_only"  # an execution option: this connection's transaction only reads


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for reads only. On an engine made with ``serialized_writes`` its transaction is SQLite's
    deferred one: a snapshot of the database that waits for no writer and makes none wait (WAL), where
    ``BEGIN IMMEDIATE`` would queue a read behind every write, and every write behind it."""
    with engine.connect() as connection:
        connection.execution_options(**{_READS_ONLY: True})
        yield connection


@contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """``engine.begin()`` for a write transaction, queued behind this process's other writers to the same SQLite
    file (whatever engine they use). SQLite lets one writer in at a time; a writer that finds the lock taken
    sleeps in its busy handler, in steps that grow to 100 ms, and so waits on average far longer than the
    writer before it took, while one waiting on a lock of ours starts the moment the lock is free. Writers in
    other processes still meet in the busy handler. PostgreSQL: ``engine.begin()``, unchanged."""
    with _write_lock(engine.dialect.name, engine.url.database) or nullcontext(), engine.begin() as connection:
        yield connection


_WRITE_LOCKS: dict[str, threading.RLock] = {}  # SQLite file -> its writers' lock in this process
_WRITE_LOCKS_GUARD = threading.Lock()


@functools.cache  # the path is resolved once per database name, not on every write
def _write_lock(dialect: str, database: str | None) -> threading.RLock | None:
    if dialect != "sqlite" or not database or database == ":memory:":
        return None
    with _WRITE_LOCKS_GUARD:  # two names of one file share its lock
        return _WRITE_LOCKS.setdefault(os.path.realpath(database), threading.RLock())


def _begin_serialized(connection: Connection) -> None:
    deferred = connection.get_execution_options().get(_READS_ONLY, False)
    connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE of the identity tables relies on it
    cursor.close()


MIGRATIONS = Path(__file__).parent / "migrations"


def import_models() -> None:
    """Register every domain's tables with SQLModel's metadata."""
    import appliance.audit.models
    import appliance.budgets.models
    import appliance.db.marks
    import appliance.gateway.models
    import appliance.identity.models
    import appliance.ledger.models
    import appliance.registry.models
    import appliance.retrieval.models
    import appliance.telemetry.models  # noqa: F401


def alembic_config(connection: Any) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def create_schema(engine: Engine) -> None:
    """Bring the database schema to the newest migration (Alembic), one process at a time."""
    from alembic import command

    with _migration_lock(engine), engine.connect() as connection:
        command.upgrade(alembic_config(connection), "head")
        connection.commit()


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Several processes start together (gateway, CLI, tests): only one migrates at a time."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_advisory_lock(72837261)")
            try:
                yield
            finally:
                connection.exec_driver_sql("SELECT pg_advisory_unlock(72837261)")
                connection.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield

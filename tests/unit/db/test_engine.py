from pathlib import Path

from sqlalchemy import inspect

from appliance.db.engine import create_schema, make_engine


def test_sqlite_file_is_created_with_wal_and_the_ledger_table(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'appliance.db'}")
    create_schema(engine)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert "usage_records" in inspect(engine).get_table_names()
    engine.dispose()


def test_plain_postgresql_url_uses_the_psycopg_driver() -> None:
    engine = make_engine("postgresql://appliance:secret@127.0.0.1:1/appliance")
    assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
    assert engine.url.password == "secret"


def test_migrations_match_the_models(tmp_path: Path) -> None:
    """A model change without its migration would leave existing databases behind: refuse it here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    engine = make_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    create_schema(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == [], "run: alembic revision --autogenerate (see appliance/db/migrations)"


def test_migrating_twice_and_concurrently_is_safe(tmp_path: Path) -> None:
    import threading

    url = f"sqlite:///{tmp_path / 'twice.db'}"
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            create_schema(make_engine(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert "alembic_version" in inspect(make_engine(url)).get_table_names()


def test_reads_on_a_serialized_engine_wait_for_no_writer_and_writes_still_take_the_lock(tmp_path: Path) -> None:
    """``reading`` is a snapshot: a write transaction held open elsewhere (the tree growing, a settlement)
    neither delays it nor shows in it. The engine's own transactions still begin by taking the write lock."""
    import sqlite3
    import threading

    from sqlalchemy import text

    from appliance.db.engine import reading

    path = tmp_path / "serial.db"
    engine = make_engine(f"sqlite:///{path}", serialized_writes=True)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
        connection.execute(text("INSERT INTO t VALUES (1)"))
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (2)")
    began = threading.Event()

    def write() -> None:
        with engine.begin() as connection:
            began.set()
            connection.execute(text("INSERT INTO t VALUES (3)"))

    thread = threading.Thread(target=write)
    try:
        with reading(engine) as connection:
            assert connection.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
        thread.start()
        assert not began.wait(0.5), "a transaction of the engine's own began while another held the write lock"
    finally:
        writer.execute("COMMIT")
    thread.join(10)
    assert began.is_set()
    with reading(engine) as connection:
        assert connection.execute(text("SELECT count(*) FROM t")).scalar_one() == 3
    engine.dispose()


def test_writers_of_one_process_queue_on_its_lock_not_on_sqlites_busy_handler(tmp_path: Path) -> None:
    """Writers through ``writing`` on two engines of one file (the audit and budget stores' serialized engine,
    the ledger's plain one) never meet SQLite's lock: with its busy handler turned off, not one of them is
    refused "database is locked", while the same writers through ``engine.begin()`` are."""
    import threading

    from sqlalchemy import event, text

    from appliance.db.engine import writing

    path = tmp_path / "writers.db"
    engines = [make_engine(f"sqlite:///{path}", serialized_writes=True), make_engine(f"sqlite:///{path}")]
    for engine in engines:  # no waiting inside SQLite: a writer that finds the lock taken fails at once
        event.listen(engine, "connect", lambda dbapi, _record: dbapi.execute("PRAGMA busy_timeout=0"))
    with engines[0].begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))

    def run(begin) -> list[BaseException]:  # type: ignore[no-untyped-def]
        errors: list[BaseException] = []

        def write(engine, n: int) -> None:  # type: ignore[no-untyped-def]
            try:
                for i in range(40):
                    with begin(engine) as connection:
                        connection.execute(text("INSERT INTO t VALUES (:x)"), {"x": n * 1000 + i})
                        connection.execute(text("SELECT count(*) FROM t")).scalar_one()
                        connection.execute(text("INSERT INTO t VALUES (:x)"), {"x": -(n * 1000 + i)})
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(engines[n % 2], n)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return errors

    assert run(writing) == []
    with engines[1].connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM t")).scalar_one() == 4 * 40 * 2
    unqueued = run(lambda engine: engine.begin())
    assert unqueued and "database is locked" in str(unqueued[0]), "the check itself would not see contention"
    for engine in engines:
        engine.dispose()

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

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

"""How far the database has taken each process's record journal (``appliance/lib/journal.py``).

A writer commits the number of the last journal entry of a batch in the same transaction as the batch, so a
dead process's journal is written past its mark exactly once, whatever dies when."""

from __future__ import annotations

from sqlalchemy import BigInteger, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel


class JournalMark(SQLModel, table=True):
    __tablename__ = "journal_marks"

    journal: str = Field(primary_key=True, max_length=80)
    seq: int = Field(default=0, sa_type=BigInteger)


MARKS: Table = JournalMark.__table__  # type: ignore[attr-defined]


def set_mark(connection: Connection, journal: str, seq: int) -> None:
    """Within the caller's transaction: ``journal`` is committed up to entry ``seq``."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(MARKS).values(journal=journal, seq=seq)
    connection.execute(statement.on_conflict_do_update(index_elements=["journal"], set_={"seq": seq}))


def mark_of(connection: Connection, journal: str) -> int:
    return int(connection.execute(select(MARKS.c.seq).where(MARKS.c.journal == journal)).scalar() or 0)


def drop_mark(connection: Connection, journal: str) -> None:
    connection.execute(delete(MARKS).where(MARKS.c.journal == journal))

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


def claim_mark(connection: Connection, journal: str) -> int:
    """Within the caller's transaction: how far ``journal`` is committed, its mark held until the transaction
    ends (PostgreSQL: the row locked; SQLite: the write lock the insert takes), so a batch whose commit is still
    in flight elsewhere (a killed process's, a retried one whose first commit did land) is seen, not written
    again."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    connection.execute(dialect.insert(MARKS).values(journal=journal, seq=0).on_conflict_do_nothing())
    query = select(MARKS.c.seq).where(MARKS.c.journal == journal).with_for_update()
    return int(connection.execute(query).scalar() or 0)


def unmarked(connection: Connection, journal: str | None, seqs: list[int | None]) -> tuple[list[bool], int | None]:
    """Which entries of a batch (their journal numbers, None for one not journaled) are still to be written, and
    the mark to commit with them (None: no journal, or nothing new)."""
    if journal is None or all(seq is None for seq in seqs):
        return [True] * len(seqs), None
    done = claim_mark(connection, journal)
    keep = [seq is None or seq > done for seq in seqs]
    top = max(seq for seq in seqs if seq is not None)
    return keep, top if top > done else None


def set_mark(connection: Connection, journal: str, seq: int) -> None:
    """Within the caller's transaction: ``journal`` is committed up to entry ``seq``."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(MARKS).values(journal=journal, seq=seq)
    connection.execute(statement.on_conflict_do_update(index_elements=["journal"], set_={"seq": seq}))


def mark_of(connection: Connection, journal: str) -> int:
    return int(connection.execute(select(MARKS.c.seq).where(MARKS.c.journal == journal)).scalar() or 0)


def drop_mark(connection: Connection, journal: str) -> None:
    connection.execute(delete(MARKS).where(MARKS.c.journal == journal))

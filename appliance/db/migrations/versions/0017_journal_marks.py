"""journal marks

How far the database has taken each gateway process's record journal (usage rows and audit records are
journaled before an answer and committed in groups after it).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-01 19:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "journal_marks",
        sa.Column("journal", sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("journal"),
    )


def downgrade() -> None:
    op.drop_table("journal_marks")

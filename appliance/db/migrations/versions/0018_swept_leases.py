"""swept leases

What a sweep charged for each lease of a gateway it took for dead, so that a process alive after all is charged
what it spent once.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-03 15:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budget_swept_leases",
        sa.Column("lease_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("budget_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("window_start", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("credit", sa.BigInteger(), nullable=False),
        sa.Column("swept_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["budget_id"], ["budgets.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("lease_id", "budget_id"),
    )
    with op.batch_alter_table("budget_swept_leases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budget_swept_leases_swept_at"), ["swept_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("budget_swept_leases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_swept_leases_swept_at"))
    op.drop_table("budget_swept_leases")

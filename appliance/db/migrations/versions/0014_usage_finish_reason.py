"""usage finish reason

Why generation ended (`length` when any choice was cut off by its cap), so drift can follow the truncation rate.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 13:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("finish_reason", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_column("finish_reason")

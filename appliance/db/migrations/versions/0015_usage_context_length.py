"""usage context length

The context length of the engine that served the request (its ``max_model_len``), so drift can follow context
utilisation: prompt and completion tokens over it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.add_column(sa.Column("context_length", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records", schema=None) as batch_op:
        batch_op.drop_column("context_length")

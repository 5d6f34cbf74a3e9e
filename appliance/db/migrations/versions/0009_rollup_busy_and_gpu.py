"""engine roll-ups: busy fraction and GPU utilisation (placement economics)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 10:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("engine_rollups") as batch:
        batch.add_column(sa.Column("busy_fraction", sa.Float(), nullable=True))
        batch.add_column(sa.Column("gpu_utilization", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("engine_rollups") as batch:
        batch.drop_column("gpu_utilization")
        batch.drop_column("busy_fraction")

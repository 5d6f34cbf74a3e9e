"""budget owner and gateway liveness

Budgets record who owns them (a platform admin's budget cannot be raised or deleted by a tenant's admins);
reservations record the gateway process that holds them, and gateways leave a heartbeat, so the sweeper
releases only what a dead gateway left (liveness, not age).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 06:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateway_instances",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("host", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("gateway_instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gateway_instances_heartbeat_at"), ["heartbeat_at"], unique=False)
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=10), server_default="platform", nullable=False)
        )
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gateway_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_budget_reservations_gateway_id"), ["gateway_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("budget_reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_reservations_gateway_id"))
        batch_op.drop_column("gateway_id")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_column("owner")
    with op.batch_alter_table("gateway_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gateway_instances_heartbeat_at"))
    op.drop_table("gateway_instances")

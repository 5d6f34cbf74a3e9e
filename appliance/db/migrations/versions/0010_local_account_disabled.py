"""local account disabled

A local account of the embedded issuer can be disabled (and enabled again) by an administrator: refused at
sign-in, its console sessions end at their next request.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("local_accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("local_accounts", schema=None) as batch_op:
        batch_op.drop_column("disabled")

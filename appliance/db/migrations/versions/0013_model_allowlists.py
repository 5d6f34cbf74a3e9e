"""model allowlists

An administrator decides which models a tenant, or one of its API keys, may call (null: every model).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("tenants", "api_keys"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("allowed_models", sa.JSON(), nullable=True))


def downgrade() -> None:
    for table in ("tenants", "api_keys"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("allowed_models")

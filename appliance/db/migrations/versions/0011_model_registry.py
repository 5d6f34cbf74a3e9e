"""model registry

Imported model versions (files with sha256 and size, what their config says, serving options, lifecycle state
with who and when), every transition, and what each served name points at now.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 12:48:54
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("served_name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("source_format", sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
        sa.Column("path", sqlmodel.sql.sqltypes.AutoString(length=1000), nullable=False),
        sa.Column("runner", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("engine_kind", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("architecture", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("context_length", sa.Integer(), nullable=False),
        sa.Column("dtype", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("param_count", sa.Integer(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("files_removed", sa.Boolean(), nullable=False),
        sa.Column("imported_by", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("imported_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("approved_by", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("approved_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("deployed_by", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("deployed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("retired_by", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("retired_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("served_name", "version"),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_served_name"), ["served_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_versions_state"), ["state"], unique=False)

    op.create_table(
        "model_transitions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("action", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("from_state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
        sa.Column("to_state", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("actor", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("model_transitions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_transitions_version_id"), ["version_id"], unique=False)

    op.create_table(
        "served_models",
        sa.Column("served_name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("previous_version_id", sa.Integer(), nullable=True),
        sa.Column("runner", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("engines", sa.JSON(), nullable=False),
        sa.Column("switched_by", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("switched_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["previous_version_id"],
            ["model_versions.id"],
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["model_versions.id"],
        ),
        sa.PrimaryKeyConstraint("served_name"),
    )


def downgrade() -> None:
    op.drop_table("served_models")
    with op.batch_alter_table("model_transitions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_transitions_version_id"))

    op.drop_table("model_transitions")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_state"))
        batch_op.drop_index(batch_op.f("ix_model_versions_served_name"))

    op.drop_table("model_versions")

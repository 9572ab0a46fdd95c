"""Telemetry retention: ``telemetry_rollups.resolution_s``, the width of a bucket that
retention merged into a coarser tier (NULL: the ingest bucket, as every row so far).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 18:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (SQLite too): the rollups table, the largest, is not copied.
    op.add_column("telemetry_rollups", sa.Column("resolution_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("telemetry_rollups") as batch:
        batch.drop_column("resolution_s")

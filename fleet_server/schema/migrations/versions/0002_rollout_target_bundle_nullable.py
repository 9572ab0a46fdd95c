"""A rollout target's bundle may be NULL (a device rolled back to "nothing in this slot").

The rollout engine made ``rollout_targets.bundle_sha256`` nullable; databases created before
that kept the NOT NULL, which the start-up column adder could not relax. Databases created
since already allow NULL, and this revision leaves them as they are.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 18:05:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _nullable() -> bool:
    columns = sa.inspect(op.get_bind()).get_columns("rollout_targets")
    return bool(next(c for c in columns if c["name"] == "bundle_sha256")["nullable"])


def upgrade() -> None:
    if _nullable():
        return
    # SQLite cannot alter a column: batch mode copies the table, rows and indexes included.
    with op.batch_alter_table("rollout_targets") as batch:
        batch.alter_column("bundle_sha256", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    """Nothing: NOT NULL was a mistake, and rows written since may hold NULL."""

"""Decommissioning: ``devices.decommissioned_at``, and the client certificates the fleet CA
issued (``device_certificates``: their serials are what the broker's revocation list names).

Devices enrolled before this revision have no recorded certificate: decommissioning them
revokes their credential and denies their topics at the broker, and their certificate expires
on its own.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 18:27:26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "device_certificates",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index(op.f("ix_device_certificates_device_id"), "device_certificates", ["device_id"])
    op.create_index(
        op.f("ix_device_certificates_revoked_at"), "device_certificates", ["revoked_at"]
    )
    # A plain ADD COLUMN (SQLite too): the devices table is not copied.
    op.add_column(
        "devices", sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_index(op.f("ix_devices_decommissioned_at"), "devices", ["decommissioned_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_devices_decommissioned_at"), table_name="devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("decommissioned_at")
    op.drop_table("device_certificates")

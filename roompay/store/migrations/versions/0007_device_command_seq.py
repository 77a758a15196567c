"""number each device's commands with a counter on the device

A new command's sequence number was the count of the device's commands, read after
locking the device; now it is `command_seq + 1`, taken by the UPDATE that also locks
the row, so the hot path asks one question instead of two. Existing devices start
from the count they had.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("command_seq", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE devices SET command_seq ="
        " (SELECT count(*) FROM commands WHERE commands.device_id = devices.id)"
    )


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("command_seq")

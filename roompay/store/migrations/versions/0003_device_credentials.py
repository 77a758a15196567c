"""device credentials

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mqtt_username", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("mqtt_password_hash", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("credentials_issued_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("key_id", sa.String(length=16), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_devices_mqtt_username"), ["mqtt_username"])


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_devices_mqtt_username"), type_="unique")
        batch_op.drop_column("key_id")
        batch_op.drop_column("credentials_issued_at")
        batch_op.drop_column("mqtt_password_hash")
        batch_op.drop_column("mqtt_username")

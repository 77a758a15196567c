"""refunds in depth, flags, audit log

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("hotel_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["hotel_id"], ["hotels.id"], name=op.f("fk_audit_log_hotel_id_hotels")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_audit_log_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.add_column(sa.Column("paid_amount_fen", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("flag", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("last_queried_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("closed_at_provider", sa.Boolean(), nullable=False, server_default=sa.false())
        )

    with op.batch_alter_table("refunds", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requested_by", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("note", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("provider_refund_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("last_error", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_refunds_status"), ["status"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_refunds_requested_by_users"), "users", ["requested_by"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("refunds", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_refunds_requested_by_users"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_refunds_status"))
        batch_op.drop_column("finished_at")
        batch_op.drop_column("last_error")
        batch_op.drop_column("provider_refund_id")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("attempts")
        batch_op.drop_column("note")
        batch_op.drop_column("requested_by")

    with op.batch_alter_table("orders", schema=None) as batch_op:
        batch_op.drop_column("closed_at_provider")
        batch_op.drop_column("last_queried_at")
        batch_op.drop_column("flag")
        batch_op.drop_column("paid_amount_fen")

    op.drop_table("audit_log")

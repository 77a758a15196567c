"""ledger, contracts, statements, reconciliation

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from datetime import UTC, date, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EPOCH = date(1970, 1, 1)


def upgrade() -> None:
    contracts = op.create_table(
        "hotel_contracts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hotel_id", sa.Integer(), nullable=False),
        sa.Column("effective_from", sa.Date(), nullable=False),
        sa.Column("share_bp", sa.Integer(), nullable=False),
        sa.Column("basis", sa.String(length=16), nullable=False),
        sa.Column("min_monthly_guarantee_fen", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["hotel_id"], ["hotels.id"], name=op.f("fk_hotel_contracts_hotel_id_hotels")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hotel_contracts")),
        sa.UniqueConstraint("hotel_id", "effective_from", name=op.f("uq_hotel_contracts_hotel_id")),
    )
    schedules = op.create_table(
        "provider_fee_schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wallet", sa.String(length=16), nullable=False),
        sa.Column("effective_from", sa.Date(), nullable=False),
        sa.Column("rate_bp", sa.Integer(), nullable=False),
        sa.Column("refund_rule", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_fee_schedules")),
        sa.UniqueConstraint(
            "wallet", "effective_from", name=op.f("uq_provider_fee_schedules_wallet")
        ),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("source_key", sa.String(length=128), nullable=False),
        sa.Column("posted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("booked_on", sa.Date(), nullable=False),
        sa.Column("order_id", sa.String(length=64), nullable=True),
        sa.Column("hotel_id", sa.Integer(), nullable=False),
        sa.Column("wallet", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["hotel_id"], ["hotels.id"], name=op.f("fk_ledger_entries_hotel_id_hotels")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_ledger_entries_order_id_orders")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sa.UniqueConstraint("kind", "source_key", name=op.f("uq_ledger_entries_kind")),
    )
    op.create_index(op.f("ix_ledger_entries_order_id"), "ledger_entries", ["order_id"])
    op.create_index("ix_ledger_entries_hotel_booked", "ledger_entries", ["hotel_id", "booked_on"])
    op.create_index("ix_ledger_entries_wallet_booked", "ledger_entries", ["wallet", "booked_on"])
    op.create_table(
        "ledger_lines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("debit_fen", sa.BigInteger(), nullable=False),
        sa.Column("credit_fen", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_ledger_lines_entry_id_ledger_entries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_lines")),
    )
    op.create_index(op.f("ix_ledger_lines_entry_id"), "ledger_lines", ["entry_id"])
    op.create_index(op.f("ix_ledger_lines_account"), "ledger_lines", ["account"])
    op.create_table(
        "statements",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("hotel_id", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("granularity", sa.String(length=8), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("orders_count", sa.Integer(), nullable=False),
        sa.Column("refunds_count", sa.Integer(), nullable=False),
        sa.Column("gross_fen", sa.BigInteger(), nullable=False),
        sa.Column("refunded_fen", sa.BigInteger(), nullable=False),
        sa.Column("fee_fen", sa.BigInteger(), nullable=False),
        sa.Column("hotel_fen", sa.BigInteger(), nullable=False),
        sa.Column("manufacturer_fen", sa.BigInteger(), nullable=False),
        sa.Column("suspense_fen", sa.BigInteger(), nullable=False),
        sa.Column("guarantee_fen", sa.BigInteger(), nullable=False),
        sa.Column("lines_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["hotel_id"], ["hotels.id"], name=op.f("fk_statements_hotel_id_hotels")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statements")),
        sa.UniqueConstraint("hotel_id", "period", name=op.f("uq_statements_hotel_id")),
    )
    op.create_table(
        "statement_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("statement_id", sa.Integer(), nullable=False),
        sa.Column("entry_id", sa.Integer(), nullable=False),
        sa.Column("granularity", sa.String(length=8), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_statement_entries_entry_id_ledger_entries"),
        ),
        sa.ForeignKeyConstraint(
            ["statement_id"],
            ["statements.id"],
            name=op.f("fk_statement_entries_statement_id_statements"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_statement_entries")),
        sa.UniqueConstraint(
            "granularity", "entry_id", name=op.f("uq_statement_entries_granularity")
        ),
    )
    op.create_index(
        op.f("ix_statement_entries_statement_id"), "statement_entries", ["statement_id"]
    )
    op.create_table(
        "reconciliation_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bill_date", sa.Date(), nullable=False),
        sa.Column("wallet", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_reports")),
        sa.UniqueConstraint(
            "bill_date", "wallet", "version", name=op.f("uq_reconciliation_reports_bill_date")
        ),
    )
    op.create_table(
        "reconciliation_lines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=24), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("out_trade_no", sa.String(length=64), nullable=False),
        sa.Column("refund_key", sa.String(length=64), nullable=True),
        sa.Column("ours_fen", sa.BigInteger(), nullable=True),
        sa.Column("theirs_fen", sa.BigInteger(), nullable=True),
        sa.Column("our_fee_fen", sa.BigInteger(), nullable=True),
        sa.Column("their_fee_fen", sa.BigInteger(), nullable=True),
        sa.Column("note", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reconciliation_reports.id"],
            name=op.f("fk_reconciliation_lines_report_id_reconciliation_reports"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_lines")),
    )
    op.create_index(
        op.f("ix_reconciliation_lines_report_id"), "reconciliation_lines", ["report_id"]
    )
    op.create_table(
        "order_funds",
        sa.Column("order_id", sa.String(length=64), nullable=False),
        sa.Column("wallet", sa.String(length=16), nullable=False),
        sa.Column("bill_date", sa.Date(), nullable=False),
        sa.Column("report_id", sa.Integer(), nullable=False),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_order_funds_order_id_orders")
        ),
        sa.ForeignKeyConstraint(
            ["report_id"],
            ["reconciliation_reports.id"],
            name=op.f("fk_order_funds_report_id_reconciliation_reports"),
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_order_funds")),
    )
    # Both sandboxes charge 0.6 % per line; WeChat Pay gives the fee back per refund
    # line, Alipay on the cumulative amount refunded.
    op.bulk_insert(
        schedules,
        [
            {"wallet": "wechat", "effective_from": EPOCH, "rate_bp": 60, "refund_rule": "per_line"},
            {
                "wallet": "alipay",
                "effective_from": EPOCH,
                "rate_bp": 60,
                "refund_rule": "cumulative",
            },
        ],
    )
    # Hotels that exist already get the default contract: 30 % of gross, from the epoch.
    hotels = op.get_bind().execute(sa.text("SELECT id FROM hotels")).scalars().all()
    now = datetime.now(UTC)
    op.bulk_insert(
        contracts,
        [
            {
                "hotel_id": hotel_id,
                "effective_from": EPOCH,
                "share_bp": 3000,
                "basis": "gross",
                "min_monthly_guarantee_fen": 0,
                "created_at": now,
            }
            for hotel_id in hotels
        ],
    )


def downgrade() -> None:
    op.drop_table("order_funds")
    op.drop_index(op.f("ix_reconciliation_lines_report_id"), table_name="reconciliation_lines")
    op.drop_table("reconciliation_lines")
    op.drop_table("reconciliation_reports")
    op.drop_index(op.f("ix_statement_entries_statement_id"), table_name="statement_entries")
    op.drop_table("statement_entries")
    op.drop_table("statements")
    op.drop_index(op.f("ix_ledger_lines_account"), table_name="ledger_lines")
    op.drop_index(op.f("ix_ledger_lines_entry_id"), table_name="ledger_lines")
    op.drop_table("ledger_lines")
    op.drop_index("ix_ledger_entries_wallet_booked", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_hotel_booked", table_name="ledger_entries")
    op.drop_index(op.f("ix_ledger_entries_order_id"), table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_table("provider_fee_schedules")
    op.drop_table("hotel_contracts")

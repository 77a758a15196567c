"""Tables. One schema for SQLite and PostgreSQL, created only by the migrations."""

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back as an aware UTC datetime.

    SQLite keeps no time zone, so without this it would hand back naive values.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with stable constraint names for migrations."""

    metadata = MetaData(naming_convention=NAMING)


class Operator(Base):
    """The manufacturer that places appliances and runs the platform."""

    __tablename__ = "operators"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))


class Hotel(Base):
    """A hotel whose rooms hold appliances; it shares the revenue."""

    __tablename__ = "hotels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    operator_id: Mapped[int] = mapped_column(ForeignKey("operators.id"))
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))


class Room(Base):
    """A room of a hotel."""

    __tablename__ = "rooms"
    __table_args__ = (UniqueConstraint("hotel_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    number: Mapped[str] = mapped_column(String(32))


class Device(Base):
    """An appliance with its IoT module, placed in a room of a hotel."""

    __tablename__ = "devices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    room_id: Mapped[int | None] = mapped_column(ForeignKey("rooms.id"))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    boot_id: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="idle")
    current_order_id: Mapped[str | None] = mapped_column(String(64))
    last_seen_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Broker login; only the hash of the password is kept (Mosquitto's `$7$` format).
    # NULL on devices placed before provisioning existed: they cannot log in.
    mqtt_username: Mapped[str | None] = mapped_column(String(64), unique=True)
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(255))
    credentials_issued_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Which command key the device holds; the key is derived from the server secret.
    key_id: Mapped[str | None] = mapped_column(String(16))
    # The sequence number of the last command issued to the device (it rises by one).
    command_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Program(Base):
    """What a guest can buy on one kind of appliance in one hotel, at that hotel's price."""

    __tablename__ = "programs"
    __table_args__ = (UniqueConstraint("hotel_id", "code"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    code: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(100))
    duration_s: Mapped[int] = mapped_column(Integer)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Order(Base):
    """One guest purchase: a program on a device, paid through one wallet."""

    __tablename__ = "orders"
    __table_args__ = (
        UniqueConstraint("device_id", "idempotency_key"),
        Index("ix_orders_status_expires", "status", "expires_at"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"))
    program_code: Mapped[str] = mapped_column(String(32))
    wallet: Mapped[str] = mapped_column(String(16))
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    duration_s: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str] = mapped_column(String(64))
    qr_content: Mapped[str | None] = mapped_column(Text)
    provider_trade_no: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    paid_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    actual_run_s: Mapped[int | None] = mapped_column(Integer)
    end_reason: Mapped[str | None] = mapped_column(String(32))
    # What the provider says the guest paid; differs from amount_fen only on a flagged order.
    paid_amount_fen: Mapped[int | None] = mapped_column(BigInteger)
    flag: Mapped[str | None] = mapped_column(String(32))
    last_queried_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    closed_at_provider: Mapped[bool] = mapped_column(Boolean, default=False)


class OrderEvent(Base):
    """The timeline of an order, for staff and for disputes; append-only."""

    __tablename__ = "order_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    event: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class PaymentNotice(Base):
    """Every verified payment notification received, matched to an order or kept as orphan."""

    __tablename__ = "payment_notices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    wallet: Mapped[str] = mapped_column(String(16))
    notification_id: Mapped[str] = mapped_column(String(128))
    out_trade_no: Mapped[str] = mapped_column(String(64), index=True)
    provider_trade_no: Mapped[str] = mapped_column(String(64))
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    trade_state: Mapped[str] = mapped_column(String(16))
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"))
    outcome: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Command(Base):
    """The outbox: a command to a device, written in the transaction that decided it."""

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_status_next", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    deadline_at: Mapped[datetime] = mapped_column(UtcDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    answer: Mapped[str | None] = mapped_column(String(64))


class RunEventRecord(Base):
    """A run event reported by a device, kept once per (run, event, seq)."""

    __tablename__ = "run_events"
    __table_args__ = (UniqueConstraint("run_id", "event", "seq"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id"))
    run_id: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(16))
    seq: Mapped[int] = mapped_column(Integer)
    elapsed_s: Mapped[int] = mapped_column(Integer)
    remaining_s: Mapped[int] = mapped_column(Integer)
    reported_at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())


class Refund(Base):
    """A refund owed to a guest; one per refund key, whatever retries happen."""

    __tablename__ = "refunds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    refund_key: Mapped[str] = mapped_column(String(64), unique=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    requested_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    note: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    provider_refund_id: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(String(200))
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class AuditEntry(Base):
    """A staff action on money or machines, kept for ever."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    hotel_id: Mapped[int | None] = mapped_column(ForeignKey("hotels.id"))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class User(Base):
    """A person who signs in: operator staff or hotel staff."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(32))
    hotel_id: Mapped[int | None] = mapped_column(ForeignKey("hotels.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class HotelContract(Base):
    """A hotel's revenue share from a date on; a later row supersedes it from its date."""

    __tablename__ = "hotel_contracts"
    __table_args__ = (UniqueConstraint("hotel_id", "effective_from"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    effective_from: Mapped[date] = mapped_column(Date)
    share_bp: Mapped[int] = mapped_column(Integer)
    basis: Mapped[str] = mapped_column(String(16))
    min_monthly_guarantee_fen: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ProviderFeeSchedule(Base):
    """A provider's fee rate from a date on."""

    __tablename__ = "provider_fee_schedules"
    __table_args__ = (UniqueConstraint("wallet", "effective_from"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    wallet: Mapped[str] = mapped_column(String(16))
    effective_from: Mapped[date] = mapped_column(Date)
    rate_bp: Mapped[int] = mapped_column(Integer)
    refund_rule: Mapped[str] = mapped_column(String(16))


class LedgerEntry(Base):
    """One balanced journal entry; append-only, posted once per (kind, source key)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("kind", "source_key"),
        Index("ix_ledger_entries_hotel_booked", "hotel_id", "booked_on"),
        Index("ix_ledger_entries_wallet_booked", "wallet", "booked_on"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    source_key: Mapped[str] = mapped_column(String(128))
    posted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # When the money moved (the provider's time where known), and its Beijing day.
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime())
    booked_on: Mapped[date] = mapped_column(Date)
    order_id: Mapped[str | None] = mapped_column(ForeignKey("orders.id"), index=True)
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    wallet: Mapped[str | None] = mapped_column(String(16))


class LedgerLine(Base):
    """One debit or credit of an entry, in fen; exactly one of the two is non-zero."""

    __tablename__ = "ledger_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"), index=True)
    account: Mapped[str] = mapped_column(String(64), index=True)
    debit_fen: Mapped[int] = mapped_column(BigInteger)
    credit_fen: Mapped[int] = mapped_column(BigInteger)


class Statement(Base):
    """An issued settlement statement of one hotel for one period; never changed."""

    __tablename__ = "statements"
    __table_args__ = (UniqueConstraint("hotel_id", "period"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"))
    period: Mapped[str] = mapped_column(String(10))
    granularity: Mapped[str] = mapped_column(String(8))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())
    orders_count: Mapped[int] = mapped_column(Integer)
    refunds_count: Mapped[int] = mapped_column(Integer)
    gross_fen: Mapped[int] = mapped_column(BigInteger)
    refunded_fen: Mapped[int] = mapped_column(BigInteger)
    fee_fen: Mapped[int] = mapped_column(BigInteger)
    hotel_fen: Mapped[int] = mapped_column(BigInteger)
    manufacturer_fen: Mapped[int] = mapped_column(BigInteger)
    suspense_fen: Mapped[int] = mapped_column(BigInteger)
    guarantee_fen: Mapped[int] = mapped_column(BigInteger)
    lines_hash: Mapped[str] = mapped_column(String(64))


class StatementEntry(Base):
    """A ledger entry counted in a statement; once per granularity, so never twice."""

    __tablename__ = "statement_entries"
    __table_args__ = (UniqueConstraint("granularity", "entry_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    statement_id: Mapped[int] = mapped_column(ForeignKey("statements.id"), index=True)
    entry_id: Mapped[int] = mapped_column(ForeignKey("ledger_entries.id"))
    granularity: Mapped[str] = mapped_column(String(8))


class ReconciliationReport(Base):
    """One comparison of a provider's daily bill with the ledger; versions are kept."""

    __tablename__ = "reconciliation_reports"
    __table_args__ = (UniqueConstraint("bill_date", "wallet", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bill_date: Mapped[date] = mapped_column(Date)
    wallet: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)


class ReconciliationLine(Base):
    """One bill line or ledger entry of a report, and the class it fell in."""

    __tablename__ = "reconciliation_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_reports.id"), index=True)
    outcome: Mapped[str] = mapped_column(String(24))
    kind: Mapped[str] = mapped_column(String(16))
    out_trade_no: Mapped[str] = mapped_column(String(64))
    refund_key: Mapped[str | None] = mapped_column(String(64))
    ours_fen: Mapped[int | None] = mapped_column(BigInteger)
    theirs_fen: Mapped[int | None] = mapped_column(BigInteger)
    our_fee_fen: Mapped[int | None] = mapped_column(BigInteger)
    their_fee_fen: Mapped[int | None] = mapped_column(BigInteger)
    note: Mapped[str] = mapped_column(String(200), default="")


class OrderFunds(Base):
    """An order whose payment a provider's bill confirmed: its funds arrived."""

    __tablename__ = "order_funds"
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), primary_key=True)
    wallet: Mapped[str] = mapped_column(String(16))
    bill_date: Mapped[date] = mapped_column(Date)
    report_id: Mapped[int] = mapped_column(ForeignKey("reconciliation_reports.id"))
    confirmed_at: Mapped[datetime] = mapped_column(UtcDateTime())


class WebhookEndpoint(Base):
    """A hotel's system that receives every consumption record; one URL per hotel.

    The signing secret is never stored: it is derived from the server's secret key and
    `secret_salt`, shown once at registration, and changes with every registration.
    """

    __tablename__ = "webhook_endpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"), unique=True)
    url: Mapped[str] = mapped_column(String(500))
    secret_salt: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))


class WebhookDelivery(Base):
    """The webhook outbox: one record for one endpoint, written with the record itself."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("webhook_endpoints.id"))
    hotel_id: Mapped[int] = mapped_column(ForeignKey("hotels.id"), index=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("order_events.id"))
    event: Mapped[str] = mapped_column(String(32))
    order_id: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(200))

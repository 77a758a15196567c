"""The statements of the hot path (a payment starting an appliance), built once.

Building a SQLAlchemy statement and computing its cache key costs several times more
than executing it (about 0.6 ms against 0.1 ms for a small UPDATE on the development
machine), so the statements a guest waits on are built here once, with bind
parameters, and executed with a dict of values. Each says in its name what it does;
the parameters are the `bindparam` names.

They run on SQLite and PostgreSQL alike. SQLite's RETURNING names columns without
their table, so no correlated subquery goes into a RETURNING clause here. Bind
parameters are all named `p_*`: SQLAlchemy reserves a table's column names in an
UPDATE or INSERT.
"""

from datetime import date
from typing import Any

from sqlalchemy import (
    ColumnElement,
    ScalarSelect,
    and_,
    bindparam,
    case,
    exists,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import InstrumentedAttribute

from roompay.store.models import (
    Command,
    Device,
    HotelContract,
    LedgerEntry,
    LedgerLine,
    Order,
    OrderEvent,
    PaymentNotice,
    ProviderFeeSchedule,
    Refund,
    RunEventRecord,
    WebhookEndpoint,
)

OPEN_COMMAND = ("pending", "sent")

# --- payments ----------------------------------------------------------------------------

PAY_ORDER = (
    update(Order)
    .where(
        Order.id == bindparam("p_order_id"),
        Order.status == "awaiting_payment",
        Order.wallet == bindparam("p_wallet"),
        Order.amount_fen == bindparam("p_amount_fen"),
    )
    .values(
        status="paid",
        paid_at=bindparam("p_paid_at"),
        paid_amount_fen=bindparam("p_amount_fen"),
        provider_trade_no=bindparam("p_provider_trade_no"),
    )
    .returning(Order.hotel_id, Order.device_id, Order.program_code, Order.duration_s)
)
"""Move an order awaiting exactly this payment to paid (row locked); no row: not the case."""


def _in_force(
    column: InstrumentedAttribute[Any],
    match: ColumnElement[bool],
    effective_from: InstrumentedAttribute[date],
) -> ScalarSelect[Any]:
    return (
        select(column)
        .where(match, effective_from <= bindparam("p_day"))
        .order_by(effective_from.desc())
        .limit(1)
        .scalar_subquery()
    )


_CONTRACT = HotelContract.hotel_id == bindparam("p_hotel_id")
_FEES = ProviderFeeSchedule.wallet == bindparam("p_wallet")

PAYMENT_TERMS = select(
    *(
        _in_force(column, _CONTRACT, HotelContract.effective_from).label(name)
        for name, column in (
            ("c_effective_from", HotelContract.effective_from),
            ("c_share_bp", HotelContract.share_bp),
            ("c_basis", HotelContract.basis),
            ("c_min_monthly_guarantee_fen", HotelContract.min_monthly_guarantee_fen),
        )
    ),
    *(
        _in_force(column, _FEES, ProviderFeeSchedule.effective_from).label(name)
        for name, column in (
            ("f_effective_from", ProviderFeeSchedule.effective_from),
            ("f_rate_bp", ProviderFeeSchedule.rate_bp),
            ("f_refund_rule", ProviderFeeSchedule.refund_rule),
        )
    ),
    select(WebhookEndpoint.id)
    .where(WebhookEndpoint.hotel_id == bindparam("p_hotel_id"), WebhookEndpoint.active.is_(True))
    .scalar_subquery()
    .label("webhook_endpoint"),
)
"""The hotel's contract and the wallet's fee schedule in force on `day` (the latest
`effective_from` on or before it, as `domain.ledger.in_force` picks), and the hotel's
active webhook endpoint; NULLs where there is none."""

NEXT_COMMAND_SEQ = (
    update(Device)
    .where(Device.id == bindparam("p_device_id"))
    .values(command_seq=Device.command_seq + 1)
    .returning(Device.command_seq, Device.code, Device.key_id)
)
"""Take the device's next command number (and its row lock until commit)."""

INSERT_ENTRY = insert(LedgerEntry).returning(LedgerEntry.id)
INSERT_LINES = insert(LedgerLine)
INSERT_COMMAND = insert(Command)
INSERT_NOTICE = insert(PaymentNotice)
INSERT_STEPS = insert(OrderEvent)
INSERT_STEPS_RETURNING_IDS = insert(OrderEvent).returning(
    OrderEvent.id, sort_by_parameter_order=True
)

# --- devices -----------------------------------------------------------------------------

DEVICE_PRESENCE = (
    update(Device)
    .where(Device.code == bindparam("p_code"), Device.boot_id <= bindparam("p_boot_id"))
    .values(
        boot_id=bindparam("p_boot_id"),
        online=bindparam("p_online"),
        last_seen_at=bindparam("p_now"),
    )
    .returning(Device.id)
)
"""A birth or a will, unless an earlier boot's (a stale will must not undo a newer birth)."""

DEVICE_BOOTED = (
    update(Device)
    .where(Device.code == bindparam("p_code"), Device.boot_id <= bindparam("p_boot_id"))
    .values(boot_id=bindparam("p_boot_id"), last_seen_at=bindparam("p_now"))
    .returning(Device.id)
)

DEVICE_ID = select(Device.id).where(Device.code == bindparam("p_code"))

HEARTBEAT = (
    update(Device)
    .where(Device.code == bindparam("p_code"))
    .values(last_seen_at=bindparam("p_now"), online=True)
)

RESEND_OPEN_COMMANDS = (
    update(Command)
    .where(Command.device_id == bindparam("p_device_id"), Command.status.in_(OPEN_COMMAND))
    .values(next_attempt_at=bindparam("p_now"))
)
"""Make a device's unanswered commands due now."""

ACCEPT_START = (
    update(Command)
    .where(
        Command.id == bindparam("p_cmd_id"),
        Command.kind == "start",
        Command.status.in_(OPEN_COMMAND),
        Command.device_id
        == select(Device.id).where(Device.code == bindparam("p_code")).scalar_subquery(),
    )
    .values(status="accepted", answered_at=bindparam("p_now"), answer=bindparam("p_answer"))
    .returning(Command.order_id, Command.created_at)
)
"""Record that this device accepted this open start command; no row: not the case."""

RUN_ORDER = (
    select(
        Order.status,
        Order.hotel_id,
        Device.id.label("device_id"),
        exists().where(Refund.order_id == Order.id).label("refunds"),
        select(WebhookEndpoint.id)
        .where(WebhookEndpoint.hotel_id == Order.hotel_id, WebhookEndpoint.active.is_(True))
        .scalar_subquery()
        .label("webhook_endpoint"),
    )
    .join(Device, Device.id == Order.device_id)
    .where(Order.id == bindparam("p_order_id"), Device.code == bindparam("p_code"))
    .with_for_update(of=Order)
)
"""The order a run event is about, locked, if it is this device's."""

_RUN_EVENT: dict[str, Any] = {
    "order_id": bindparam("p_order_id"),
    "device_id": bindparam("p_device_id"),
    "run_id": bindparam("p_run_id"),
    "event": bindparam("p_event"),
    "seq": bindparam("p_seq"),
    "elapsed_s": bindparam("p_elapsed_s"),
    "remaining_s": bindparam("p_remaining_s"),
    "reported_at": bindparam("p_reported_at"),
    "received_at": bindparam("p_received_at"),
}
KEEP_RUN_EVENT = {
    "postgresql": postgresql.insert(RunEventRecord)
    .values(_RUN_EVENT)
    .on_conflict_do_nothing()
    .returning(RunEventRecord.id),
    "sqlite": sqlite.insert(RunEventRecord)
    .values(_RUN_EVENT)
    .on_conflict_do_nothing()
    .returning(RunEventRecord.id),
}
"""Keep a run event once per (run, event, seq), by dialect; no row: a repeat."""

START_RUN_ORDER = (
    update(Order)
    .where(Order.id == bindparam("p_order_id"))
    .values(status="running", started_at=bindparam("p_at"))
)
START_RUN_DEVICE = (
    update(Device)
    .where(Device.id == bindparam("p_device_id"))
    .values(
        # A fault reported meanwhile stands until the device clears it.
        state=case((Device.state == "fault", Device.state), else_="running"),
        current_order_id=bindparam("p_order_id"),
    )
)
COMPLETE_RUN_ORDER = (
    update(Order)
    .where(Order.id == bindparam("p_order_id"))
    .values(
        status="completed",
        ended_at=bindparam("p_at"),
        actual_run_s=bindparam("p_actual_run_s"),
        end_reason=bindparam("p_end_reason"),
    )
)
FREE_DEVICE = (
    update(Device)
    .where(
        and_(
            Device.id == bindparam("p_device_id"),
            Device.current_order_id == bindparam("p_order_id"),
        )
    )
    .values(
        state=case((Device.state == "fault", Device.state), else_="idle"), current_order_id=None
    )
)
"""The appliance is free again after this order's run (a fault stands until cleared)."""

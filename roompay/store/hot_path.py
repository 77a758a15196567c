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
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    ScalarSelect,
    Select,
    and_,
    bindparam,
    case,
    exists,
    insert,
    or_,
    select,
    true,
    union_all,
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


def _open(status: InstrumentedAttribute[str]) -> ColumnElement[bool]:
    """A command still open, without an expanding IN: such a list is rendered again at
    each execution, and `store.driver` runs only statements compiled once."""
    return or_(*(status == value for value in OPEN_COMMAND))


def fused(connection: Connection) -> bool:
    """Tell whether this database runs the fused statements below (data-modifying CTEs:
    PostgreSQL); SQLite runs their parts one by one."""
    return connection.dialect.name == "postgresql"


# --- payments ----------------------------------------------------------------------------

ORDER_DEVICE_CODE = (
    select(Device.code)
    .join(Order, Order.device_id == Device.id)
    .where(Order.id == bindparam("p_order_id"))
)
"""The code of the appliance an order is for."""

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

_CONTRACT_COLUMNS = (
    ("c_effective_from", HotelContract.effective_from),
    ("c_share_bp", HotelContract.share_bp),
    ("c_basis", HotelContract.basis),
    ("c_min_monthly_guarantee_fen", HotelContract.min_monthly_guarantee_fen),
)
_FEE_COLUMNS = (
    ("f_effective_from", ProviderFeeSchedule.effective_from),
    ("f_rate_bp", ProviderFeeSchedule.rate_bp),
    ("f_refund_rule", ProviderFeeSchedule.refund_rule),
)

PAYMENT_TERMS = select(
    *(
        _in_force(column, _CONTRACT, HotelContract.effective_from).label(name)
        for name, column in _CONTRACT_COLUMNS
    ),
    *(
        _in_force(column, _FEES, ProviderFeeSchedule.effective_from).label(name)
        for name, column in _FEE_COLUMNS
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

# PostgreSQL runs a payment in two statements (data-modifying CTEs): one round trip
# takes the order, its appliance's next command number and the terms in force; one
# writes the entry, its lines, the command, the steps and the notice. SQLite has no
# data-modifying CTE and runs the statements above and below one by one.

_PAID = PAY_ORDER.cte("paid")
_NUMBERED = (
    update(Device)
    .where(Device.id == _PAID.c.device_id)
    .values(command_seq=Device.command_seq + 1)
    .returning(Device.command_seq, Device.code, Device.key_id)
    .cte("numbered")
)
_PAID_CONTRACT = HotelContract.hotel_id == _PAID.c.hotel_id

PAY_NUMBER_AND_TERMS = select(
    _PAID.c.hotel_id,
    _PAID.c.device_id,
    _PAID.c.program_code,
    _PAID.c.duration_s,
    _NUMBERED.c.command_seq,
    _NUMBERED.c.code,
    _NUMBERED.c.key_id,
    *(
        _in_force(column, _PAID_CONTRACT, HotelContract.effective_from).label(name)
        for name, column in _CONTRACT_COLUMNS
    ),
    *(
        _in_force(column, _FEES, ProviderFeeSchedule.effective_from).label(name)
        for name, column in _FEE_COLUMNS
    ),
    select(WebhookEndpoint.id)
    .where(WebhookEndpoint.hotel_id == _PAID.c.hotel_id, WebhookEndpoint.active.is_(True))
    .scalar_subquery()
    .label("webhook_endpoint"),
).select_from(_PAID.join(_NUMBERED, true()))
"""`PAY_ORDER`, `NEXT_COMMAND_SEQ` and `PAYMENT_TERMS` in one statement (PostgreSQL)."""

_ENTRY_COLUMNS = (
    "kind",
    "source_key",
    "posted_at",
    "occurred_at",
    "booked_on",
    "order_id",
    "hotel_id",
    "wallet",
)
_LINE_COLUMNS = ("account", "debit_fen", "credit_fen")
_COMMAND_COLUMNS = (
    "id",
    "order_id",
    "device_id",
    "kind",
    "status",
    "payload",
    "attempts",
    "created_at",
    "next_attempt_at",
    "deadline_at",
    "sent_at",
)
_STEP_COLUMNS = ("order_id", "at", "event", "detail")
_NOTICE_COLUMNS = (
    "wallet",
    "notification_id",
    "out_trade_no",
    "provider_trade_no",
    "amount_fen",
    "trade_state",
    "order_id",
    "outcome",
    "received_at",
)


def _typed(table: Any, column: str, name: str) -> Any:
    """A bind parameter with the column's type (its JSON or datetime processing)."""
    return bindparam(name, type_=table.c[column].type)


def _rows_select(selects: list[Select[Any]]) -> Any:
    return selects[0] if len(selects) == 1 else union_all(*selects)


@cache
def payment_writes(lines: int, steps: int) -> Select[Any]:
    """Write a payment's entry and `lines` lines, its command, `steps` steps and its notice
    in one statement (PostgreSQL); returns each step's (id, event).

    One statement per shape, built once. Parameters: see `payment_write_params`. The
    rows go in as INSERT ... SELECT: a multi-row VALUES would not be cached.
    """
    entries, ledger_lines = LedgerEntry.__table__, LedgerLine.__table__
    events = OrderEvent.__table__
    entry = (
        insert(LedgerEntry)
        .values({c: _typed(entries, c, f"p_e_{c}") for c in _ENTRY_COLUMNS})
        .returning(LedgerEntry.id)
        .cte("entry")
    )
    line_rows = [
        select(entry.c.id, *(_typed(ledger_lines, c, f"p_l{i}_{c}") for c in _LINE_COLUMNS))
        for i in range(lines)
    ]
    booked = (
        insert(LedgerLine)
        .from_select(["entry_id", *_LINE_COLUMNS], _rows_select(line_rows))
        .cte("booked")
    )
    command = (
        insert(Command)
        .values({c: _typed(Command.__table__, c, f"p_c_{c}") for c in _COMMAND_COLUMNS})
        .cte("command")
    )
    step_rows = [
        select(
            _typed(events, "order_id", "p_order_id"),
            _typed(events, "at", "p_at"),
            _typed(events, "event", f"p_s{i}_event"),
            _typed(events, "detail", f"p_s{i}_detail"),
        )
        for i in range(steps)
    ]
    recorded = (
        insert(OrderEvent)
        .from_select(list(_STEP_COLUMNS), _rows_select(step_rows))
        .returning(OrderEvent.id, OrderEvent.event)
        .cte("recorded")
    )
    notice = (
        insert(PaymentNotice)
        .values({c: _typed(PaymentNotice.__table__, c, f"p_n_{c}") for c in _NOTICE_COLUMNS})
        .cte("notice")
    )
    return select(recorded.c.id, recorded.c.event).add_cte(entry, booked, command, notice)


def payment_write_params(
    entry: dict[str, Any],
    lines: list[dict[str, Any]],
    command: dict[str, Any],
    steps: list[tuple[str, dict[str, Any]]],
    notice: dict[str, Any],
    *,
    order_id: str,
    at: Any,
) -> dict[str, Any]:
    """The parameters of `payment_writes(len(lines), len(steps))`, from rows by column."""
    params: dict[str, Any] = {f"p_e_{c}": entry[c] for c in _ENTRY_COLUMNS}
    for i, line in enumerate(lines):
        params |= {f"p_l{i}_{c}": line[c] for c in _LINE_COLUMNS}
    params |= {f"p_c_{c}": command[c] for c in _COMMAND_COLUMNS}
    params |= {"p_order_id": order_id, "p_at": at}
    for i, (event, detail) in enumerate(steps):
        params |= {f"p_s{i}_event": event, f"p_s{i}_detail": detail}
    params |= {f"p_n_{c}": notice[c] for c in _NOTICE_COLUMNS}
    return params


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
    .where(
        Device.code == bindparam("p_code"),
        or_(Device.last_seen_at.is_(None), Device.last_seen_at < bindparam("p_now")),
    )
    .values(last_seen_at=bindparam("p_now"), online=True)
)
"""A heartbeat heard at `p_now`: the appliance is online, unless a birth or will heard
since says otherwise (heartbeats are written in bulk, after later messages)."""

KNOWN_DEVICE_CODES = select(Device.code).where(
    Device.code.in_(bindparam("p_codes", expanding=True))
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
        _open(Command.status),
        Command.device_id
        == select(Device.id).where(Device.code == bindparam("p_code")).scalar_subquery(),
    )
    .values(status="accepted", answered_at=bindparam("p_now"), answer=bindparam("p_answer"))
    .returning(Command.order_id, Command.created_at)
)
"""Record that this device accepted this open start command; no row: not the case."""

_ACCEPTED = ACCEPT_START.cte("accepted")
_STEPS = OrderEvent.__table__

ACCEPT_START_RECORDED = select(_ACCEPTED.c.order_id, _ACCEPTED.c.created_at).add_cte(
    insert(OrderEvent)
    .from_select(
        ["order_id", "at", "event", "detail"],
        select(
            _ACCEPTED.c.order_id,
            bindparam("p_now", type_=_STEPS.c.at.type),
            bindparam("p_step_event", type_=_STEPS.c.event.type),
            bindparam("p_step_detail", type_=_STEPS.c.detail.type),
        ),
    )
    .cte("recorded")
)
"""`ACCEPT_START` and its step in one statement (PostgreSQL)."""

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


def _run_event_writes(order_update: Any, device_update: Any) -> Select[Any]:
    """Keep a run event and, only if it is new, move the order and the appliance and
    record the step, in one statement (PostgreSQL). One row (the event's and the step's
    ids) if the event is new; none if it is a repeat."""
    kept = KEEP_RUN_EVENT["postgresql"].cte("kept")
    new = select(kept.c.id).exists()
    moved = order_update.where(new).cte("moved")
    freed = device_update.where(new).cte("device")
    recorded = (
        insert(OrderEvent)
        .from_select(
            ["order_id", "at", "event", "detail"],
            select(
                bindparam("p_order_id", type_=_STEPS.c.order_id.type),
                bindparam("p_received_at", type_=_STEPS.c.at.type),
                bindparam("p_step_event", type_=_STEPS.c.event.type),
                bindparam("p_step_detail", type_=_STEPS.c.detail.type),
            ).select_from(kept),
        )
        .returning(OrderEvent.id)
        .cte("recorded")
    )
    return (
        select(kept.c.id.label("kept"), recorded.c.id.label("step_id"))
        .select_from(kept.join(recorded, true()))
        .add_cte(moved, freed)
    )


RUN_STARTED = _run_event_writes(START_RUN_ORDER, START_RUN_DEVICE)
"""`KEEP_RUN_EVENT`, `START_RUN_ORDER`, `START_RUN_DEVICE` and the step, as one (PostgreSQL)."""
RUN_COMPLETED = _run_event_writes(COMPLETE_RUN_ORDER, FREE_DEVICE)
"""`KEEP_RUN_EVENT`, `COMPLETE_RUN_ORDER`, `FREE_DEVICE` and the step, as one (PostgreSQL)."""

"""What the staff dashboard shows: rooms, order search, revenue; always within the caller's hotels.

Who sees what ("money" is revenue and statements):

| role | rooms | feed, orders, timeline, comps | money, programs, webhooks | reconciliation |
|---|---|---|---|---|
| admin | all hotels | all hotels | all hotels | yes |
| manager | own hotel | own hotel | own hotel | no |
| front_desk | own hotel | own hotel | no | no |
| technician | own hotel | no | no | no |
"""

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from roompay.services.auth import Principal, Role
from roompay.services.errors import ErrorKind, ServiceError
from roompay.services.refunds import RefundStatus
from roompay.store.models import (
    Device,
    Hotel,
    Order,
    ReconciliationLine,
    ReconciliationReport,
    Refund,
    Room,
    Statement,
)

ORDER_ROLES = frozenset({Role.ADMIN, Role.MANAGER, Role.FRONT_DESK})
REVENUE_ROLES = frozenset({Role.ADMIN, Role.MANAGER})

# Hotels keep their books in China Standard Time, which has no daylight saving.
HOTEL_TZ = timezone(timedelta(hours=8), "CST")


def require_role(principal: Principal, roles: frozenset[Role]) -> None:
    """Refuse a caller whose role may not see this part of the dashboard."""
    if principal.role not in roles:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot see this page")


@dataclass(frozen=True, slots=True)
class RoomTile:
    """One appliance in the room grid, with what it is doing now."""

    code: str
    kind: str
    hotel: str
    room: str | None
    state: str  # idle, running, offline or fault
    order_id: str | None
    ends_at: datetime | None  # when a running appliance is due to stop


def room_grid(session: Session, hotel_scope: int | None) -> list[RoomTile]:
    """The caller's appliances by hotel and room, with the end time of each running one."""
    query = (
        select(Device, Hotel.code, Room.number, Order.started_at, Order.duration_s)
        .join(Hotel, Device.hotel_id == Hotel.id)
        .outerjoin(Room, Device.room_id == Room.id)
        .outerjoin(Order, Device.current_order_id == Order.id)
        .order_by(Hotel.code, Room.number, Device.code)
    )
    if hotel_scope is not None:
        query = query.where(Device.hotel_id == hotel_scope)
    tiles = []
    for device, hotel, room, started_at, duration_s in session.execute(query):
        state = device.state if device.online else "offline"
        ends_at = None
        if state == "running" and started_at is not None and duration_s is not None:
            ends_at = started_at + timedelta(seconds=duration_s)
        tiles.append(
            RoomTile(
                code=device.code,
                kind=device.kind,
                hotel=hotel,
                room=room,
                state=state,
                order_id=device.current_order_id if state == "running" else None,
                ends_at=ends_at,
            )
        )
    return tiles


@dataclass(frozen=True, slots=True)
class OrderRow:
    """An order in a search result."""

    order_id: str
    created_at: datetime
    status: str
    device: str
    room: str | None
    program: str
    wallet: str
    amount_fen: int


def _local_day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time.min, HOTEL_TZ).astimezone(UTC)
    return start, start + timedelta(days=1)


def search_orders(
    session: Session,
    hotel_scope: int | None,
    id_prefix: str = "",
    device: str = "",
    day: date | None = None,
    limit: int = 50,
) -> list[OrderRow]:
    """The caller's orders, newest first, by order-id prefix, device code and local day."""
    query = (
        select(Order, Device.code, Room.number)
        .join(Device, Order.device_id == Device.id)
        .outerjoin(Room, Device.room_id == Room.id)
        .order_by(Order.created_at.desc(), Order.id)
        .limit(limit)
    )
    if hotel_scope is not None:
        query = query.where(Order.hotel_id == hotel_scope)
    if id_prefix:
        escaped = id_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Order.id.like(f"{escaped}%", escape="\\"))
    if device:
        query = query.where(Device.code == device)
    if day is not None:
        start, end = _local_day_bounds(day)
        query = query.where(Order.created_at >= start, Order.created_at < end)
    return [
        OrderRow(
            order_id=order.id,
            created_at=order.created_at,
            status=order.status,
            device=code,
            room=room,
            program=order.program_code,
            wallet=order.wallet,
            amount_fen=order.amount_fen,
        )
        for order, code, room in session.execute(query)
    ]


@dataclass(frozen=True, slots=True)
class RevenueLine:
    """Money of one day or one appliance kind, in fen."""

    label: str
    orders: int
    paid_fen: int
    refunded_fen: int

    @property
    def net_fen(self) -> int:
        """What was kept: paid less confirmed refunds."""
        return self.paid_fen - self.refunded_fen


@dataclass(frozen=True, slots=True)
class Revenue:
    """Revenue of the caller's hotels by local day (oldest first) and by appliance kind."""

    by_day: list[RevenueLine]
    by_kind: list[RevenueLine]
    total: RevenueLine


def revenue(session: Session, hotel_scope: int | None, today: date, days: int = 14) -> Revenue:
    """Paid orders and their confirmed refunds over the last `days` local days up to `today`.

    A refund counts against the day and kind of the order it returns money for.
    """
    first = today - timedelta(days=days - 1)
    since, _ = _local_day_bounds(first)
    _, until = _local_day_bounds(today)
    refunded = (
        select(Refund.order_id, func.sum(Refund.amount_fen).label("fen"))
        .where(Refund.status == RefundStatus.REFUNDED.value)
        .group_by(Refund.order_id)
        .subquery()
    )
    query = (
        select(Order.paid_at, Order.paid_amount_fen, Order.amount_fen, Device.kind, refunded.c.fen)
        .join(Device, Order.device_id == Device.id)
        .outerjoin(refunded, refunded.c.order_id == Order.id)
        .where(Order.paid_at.is_not(None), Order.paid_at >= since, Order.paid_at < until)
    )
    if hotel_scope is not None:
        query = query.where(Order.hotel_id == hotel_scope)
    per_day: dict[date, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for paid_at, paid_fen, amount_fen, kind, refunded_fen in session.execute(query):
        paid = int(paid_fen if paid_fen is not None else amount_fen)
        back = int(refunded_fen or 0)
        for bucket in (per_day[paid_at.astimezone(HOTEL_TZ).date()], per_kind[kind]):
            bucket[0] += 1
            bucket[1] += paid
            bucket[2] += back
    by_day = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        count, paid, back = per_day.get(day, [0, 0, 0])
        by_day.append(RevenueLine(day.isoformat(), count, paid, back))
    by_kind = [RevenueLine(kind, *per_kind[kind]) for kind in sorted(per_kind)]
    total = RevenueLine(
        "total",
        sum(line.orders for line in by_day),
        sum(line.paid_fen for line in by_day),
        sum(line.refunded_fen for line in by_day),
    )
    return Revenue(by_day, by_kind, total)


def hotel_today(now: datetime) -> date:
    """The hotels' local date at `now`."""
    return now.astimezone(HOTEL_TZ).date()


def revenue_by_hotel(
    session: Session, hotel_scope: int | None, today: date, days: int = 14
) -> list[RevenueLine]:
    """Net revenue of each hotel over the last `days` local days, by hotel code.

    The same rule as `revenue`: paid orders, less their confirmed refunds.
    """
    since, _ = _local_day_bounds(today - timedelta(days=days - 1))
    _, until = _local_day_bounds(today)
    refunded = (
        select(Refund.order_id, func.sum(Refund.amount_fen).label("fen"))
        .where(Refund.status == RefundStatus.REFUNDED.value)
        .group_by(Refund.order_id)
        .subquery()
    )
    query = (
        select(Hotel.code, Order.paid_amount_fen, Order.amount_fen, refunded.c.fen)
        .join(Hotel, Order.hotel_id == Hotel.id)
        .outerjoin(refunded, refunded.c.order_id == Order.id)
        .where(Order.paid_at.is_not(None), Order.paid_at >= since, Order.paid_at < until)
    )
    hotels = select(Hotel.code).order_by(Hotel.code)
    if hotel_scope is not None:
        query = query.where(Order.hotel_id == hotel_scope)
        hotels = hotels.where(Hotel.id == hotel_scope)
    per_hotel: dict[str, list[int]] = {code: [0, 0, 0] for code in session.scalars(hotels)}
    for code, paid_fen, amount_fen, refunded_fen in session.execute(query):
        bucket = per_hotel[code]
        bucket[0] += 1
        bucket[1] += int(paid_fen if paid_fen is not None else amount_fen)
        bucket[2] += int(refunded_fen or 0)
    return [RevenueLine(code, *per_hotel[code]) for code in per_hotel]


# --- money pages: statements and reconciliation reports --------------------------------------

STATEMENT_ROLES = frozenset({Role.ADMIN, Role.MANAGER})
RECONCILIATION_ROLES = frozenset({Role.ADMIN})


@dataclass(frozen=True, slots=True)
class StatementRow:
    """An issued statement in the list, with its totals."""

    hotel: str
    hotel_name: str
    period: str
    granularity: str
    issued_at: datetime
    orders: int
    refunds: int
    gross_fen: int
    refunded_fen: int
    fee_fen: int
    hotel_fen: int
    manufacturer_fen: int
    suspense_fen: int
    guarantee_fen: int


def list_statements(
    session: Session, hotel_scope: int | None, period_prefix: str = "", limit: int = 200
) -> list[StatementRow]:
    """Issued statements of the caller's hotels, newest period first, by hotel.

    `period_prefix` narrows to a year ("2026"), a month ("2026-11") or a day.
    """
    query = (
        select(Statement, Hotel)
        .join(Hotel, Statement.hotel_id == Hotel.id)
        .order_by(Statement.period.desc(), Hotel.code, Statement.granularity)
        .limit(limit)
    )
    if hotel_scope is not None:
        query = query.where(Statement.hotel_id == hotel_scope)
    if period_prefix:
        query = query.where(Statement.period.startswith(period_prefix, autoescape=True))
    return [
        StatementRow(
            hotel=hotel.code,
            hotel_name=hotel.name,
            period=s.period,
            granularity=s.granularity,
            issued_at=s.issued_at,
            orders=s.orders_count,
            refunds=s.refunds_count,
            gross_fen=s.gross_fen,
            refunded_fen=s.refunded_fen,
            fee_fen=s.fee_fen,
            hotel_fen=s.hotel_fen,
            manufacturer_fen=s.manufacturer_fen,
            suspense_fen=s.suspense_fen,
            guarantee_fen=s.guarantee_fen,
        )
        for s, hotel in session.execute(query)
    ]


@dataclass(frozen=True, slots=True)
class ReportRow:
    """The newest version of one wallet's reconciliation of one day, as counts per class."""

    id: int
    bill_date: date
    wallet: str
    version: int
    created_at: datetime
    counts: dict[str, int]
    amounts_fen: dict[str, int]

    @property
    def differences(self) -> int:
        """How many keys fell in a class other than matched."""
        return sum(n for outcome, n in self.counts.items() if outcome != "matched")


def list_reconciliations(session: Session, limit: int = 60) -> list[ReportRow]:
    """The newest version of each (day, wallet) report, newest day first."""
    newest = (
        select(
            ReconciliationReport.bill_date,
            ReconciliationReport.wallet,
            func.max(ReconciliationReport.version).label("version"),
        )
        .group_by(ReconciliationReport.bill_date, ReconciliationReport.wallet)
        .subquery()
    )
    query = (
        select(ReconciliationReport)
        .join(
            newest,
            (newest.c.bill_date == ReconciliationReport.bill_date)
            & (newest.c.wallet == ReconciliationReport.wallet)
            & (newest.c.version == ReconciliationReport.version),
        )
        .order_by(ReconciliationReport.bill_date.desc(), ReconciliationReport.wallet)
        .limit(limit)
    )
    return [
        ReportRow(
            id=r.id,
            bill_date=r.bill_date,
            wallet=r.wallet,
            version=r.version,
            created_at=r.created_at,
            counts={k: int(v) for k, v in dict(r.summary.get("counts", {})).items()},
            amounts_fen={k: int(v) for k, v in dict(r.summary.get("amounts_fen", {})).items()},
        )
        for r in session.scalars(query)
    ]


@dataclass(frozen=True, slots=True)
class DifferenceRow:
    """A key of a report that did not match: what we booked and what the provider billed."""

    outcome: str
    kind: str
    out_trade_no: str
    refund_key: str | None
    ours_fen: int | None
    theirs_fen: int | None
    note: str


def report_differences(session: Session, report_id: int) -> list[DifferenceRow]:
    """The unmatched lines of one report, by class."""
    rows = session.scalars(
        select(ReconciliationLine)
        .where(ReconciliationLine.report_id == report_id, ReconciliationLine.outcome != "matched")
        .order_by(ReconciliationLine.outcome, ReconciliationLine.id)
    )
    return [
        DifferenceRow(
            r.outcome, r.kind, r.out_trade_no, r.refund_key, r.ours_fen, r.theirs_fen, r.note
        )
        for r in rows
    ]

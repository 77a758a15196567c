"""Settlement statements: per hotel, per day or month, issued once and never changed.

A statement counts ledger entries booked in its period, plus late entries whose own
period was already issued (they land in the next statement issued, never in a closed
one). Each entry is counted in at most one statement per granularity (a unique
constraint), so the statements of a hotel sum to its ledger. Issuing is idempotent:
a period already issued returns the issued statement; two issuers at once end with
one statement, because (hotel, period) is unique and the loser reads the winner's.
"""

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roompay.domain import ledger as rules
from roompay.domain.ledger import EntryKind, Granularity, Period
from roompay.domain.money import yuan_str
from roompay.services.context import ServiceContext
from roompay.services.errors import conflict, invalid, not_found
from roompay.services.ledger import Booked, contract_on, entries, post
from roompay.store.db import transaction
from roompay.store.models import Hotel, LedgerEntry, Statement, StatementEntry

ISSUE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One ledger entry as a statement shows it: the order behind each figure."""

    entry_id: int
    kind: str
    order_id: str | None
    booked_on: date
    wallet: str | None
    gross_fen: int
    refunded_fen: int
    fee_fen: int
    hotel_fen: int
    manufacturer_fen: int
    suspense_fen: int


@dataclass(frozen=True, slots=True)
class Totals:
    """A statement's figures; gross - refunded == fee + hotel + manufacturer."""

    orders: int
    refunds: int
    gross_fen: int
    refunded_fen: int
    fee_fen: int
    hotel_fen: int
    manufacturer_fen: int
    suspense_fen: int
    guarantee_fen: int


@dataclass(frozen=True, slots=True)
class StatementView:
    """An issued statement with its lines."""

    hotel_code: str
    hotel_name: str
    period: str
    granularity: str
    issued_at: datetime
    totals: Totals
    lines: list[StatementLine]
    lines_hash: str
    created: bool  # False when an already issued statement was returned

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form."""
        data = asdict(self)
        data["issued_at"] = self.issued_at.isoformat()
        for line in data["lines"]:
            line["booked_on"] = line["booked_on"].isoformat()
        return data


def settle(ctx: ServiceContext, hotel_code: str, period_text: str) -> StatementView:
    """Issue (or return the issued) statement of a hotel for a finished period."""
    try:
        period = rules.parse_period(period_text)
    except ValueError as exc:
        raise invalid("bad_period", str(exc)) from exc
    if ctx.clock.now() < period.ends_at():
        raise conflict("period_not_over", f"{period.label} has not ended yet (Beijing time)")
    for _ in range(ISSUE_ATTEMPTS):
        try:
            with transaction(ctx.sessions) as session:
                return _issue(ctx, session, _hotel(session, hotel_code), period)
        except IntegrityError:
            continue  # another issuer won a statement or an entry; read again
    raise conflict("settlement_busy", "statements are being issued concurrently; try again")


def read_statement(ctx: ServiceContext, hotel_code: str, period_text: str) -> StatementView:
    """An issued statement; not_found if the period was not settled."""
    try:
        period = rules.parse_period(period_text)
    except ValueError as exc:
        raise invalid("bad_period", str(exc)) from exc
    with ctx.sessions() as session:
        hotel = _hotel(session, hotel_code)
        row = _issued(session, hotel.id, period.label)
        if row is None:
            raise not_found("unknown_statement", f"no statement issued for {period.label}")
        return _view(session, hotel, row, created=False)


def hotel_id_of(ctx: ServiceContext, hotel_code: str) -> int:
    """The id of a hotel named by its code."""
    with ctx.sessions() as session:
        return _hotel(session, hotel_code).id


def _hotel(session: Session, code: str) -> Hotel:
    hotel = session.scalars(select(Hotel).where(Hotel.code == code)).one_or_none()
    if hotel is None:
        raise not_found("unknown_hotel", f"no hotel {code!r}")
    return hotel


def _issued(session: Session, hotel_id: int, label: str) -> Statement | None:
    return session.scalars(
        select(Statement).where(Statement.hotel_id == hotel_id, Statement.period == label)
    ).one_or_none()


def _issue(ctx: ServiceContext, session: Session, hotel: Hotel, period: Period) -> StatementView:
    existing = _issued(session, hotel.id, period.label)
    if existing is not None:
        return _view(session, hotel, existing, created=False)
    now = ctx.clock.now()
    chosen = _entries_for(session, hotel.id, period)
    lines = [_line(booked) for booked in chosen]
    guarantee = 0
    if period.granularity is Granularity.MONTH:
        contract = contract_on(session, hotel.id, period.last)
        share = sum(line.hotel_fen for line in lines)
        if share < contract.min_monthly_guarantee_fen:
            guarantee = contract.min_monthly_guarantee_fen - share
            entry = post(
                session,
                rules.guarantee_posting(hotel.id, period.label, guarantee),
                now=now,
                occurred_at=period.ends_at() - timedelta(microseconds=1),
                hotel_id=hotel.id,
                order_id=None,
                wallet=None,
                booked_on=period.last,
            )
            booked = entries(session, LedgerEntry.id == entry.id)[0]
            chosen.append(booked)
            lines.append(_line(booked))
    totals = _totals(lines, guarantee)
    row = Statement(
        hotel_id=hotel.id,
        period=period.label,
        granularity=period.granularity.value,
        issued_at=now,
        orders_count=totals.orders,
        refunds_count=totals.refunds,
        gross_fen=totals.gross_fen,
        refunded_fen=totals.refunded_fen,
        fee_fen=totals.fee_fen,
        hotel_fen=totals.hotel_fen,
        manufacturer_fen=totals.manufacturer_fen,
        suspense_fen=totals.suspense_fen,
        guarantee_fen=totals.guarantee_fen,
        lines_hash=lines_hash(lines),
    )
    session.add(row)
    session.flush()
    session.add_all(
        StatementEntry(
            statement_id=row.id, entry_id=booked.entry.id, granularity=period.granularity.value
        )
        for booked in chosen
    )
    session.flush()
    return StatementView(
        hotel.code,
        hotel.name,
        row.period,
        row.granularity,
        row.issued_at,
        totals,
        lines,
        row.lines_hash,
        created=True,
    )


def _entries_for(session: Session, hotel_id: int, period: Period) -> list[Booked]:
    """Entries not yet in a statement of this granularity that belong to this one."""
    counted = select(StatementEntry.entry_id).where(
        StatementEntry.granularity == period.granularity.value
    )
    where = [
        LedgerEntry.hotel_id == hotel_id,
        LedgerEntry.booked_on <= period.last,
        LedgerEntry.id.not_in(counted),
    ]
    if period.granularity is Granularity.DAY:
        # Guarantees are monthly: they appear on the month's statement only.
        where.append(LedgerEntry.kind != EntryKind.GUARANTEE_TOPUP.value)
    closed = set(
        session.scalars(
            select(Statement.period).where(
                Statement.hotel_id == hotel_id,
                Statement.granularity == period.granularity.value,
            )
        )
    )
    return [
        booked
        for booked in entries(session, *where)
        if booked.entry.booked_on >= period.first
        or period.period_of(booked.entry.booked_on).label in closed
    ]


def _line(booked: Booked) -> StatementLine:
    entry = booked.entry
    fig = rules.figures(EntryKind(entry.kind), booked.lines)
    return StatementLine(
        entry.id,
        entry.kind,
        entry.order_id,
        entry.booked_on,
        entry.wallet,
        fig.gross_fen,
        fig.refunded_fen,
        fig.fee_fen,
        fig.hotel_fen,
        fig.manufacturer_fen,
        fig.suspense_fen,
    )


def _totals(lines: list[StatementLine], guarantee_fen: int) -> Totals:
    return Totals(
        orders=sum(1 for line in lines if line.kind == EntryKind.PAYMENT),
        refunds=sum(1 for line in lines if line.kind == EntryKind.REFUND),
        gross_fen=sum(line.gross_fen for line in lines),
        refunded_fen=sum(line.refunded_fen for line in lines),
        fee_fen=sum(line.fee_fen for line in lines),
        hotel_fen=sum(line.hotel_fen for line in lines),
        manufacturer_fen=sum(line.manufacturer_fen for line in lines),
        suspense_fen=sum(line.suspense_fen for line in lines),
        guarantee_fen=guarantee_fen,
    )


def lines_hash(lines: list[StatementLine]) -> str:
    """SHA-256 of the statement's lines in a canonical JSON form."""
    canonical = [
        {**asdict(line), "booked_on": line.booked_on.isoformat()}
        for line in sorted(lines, key=lambda line: line.entry_id)
    ]
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _view(session: Session, hotel: Hotel, row: Statement, created: bool) -> StatementView:
    counted = select(StatementEntry.entry_id).where(StatementEntry.statement_id == row.id)
    lines = [_line(booked) for booked in entries(session, LedgerEntry.id.in_(counted))]
    totals = Totals(
        row.orders_count,
        row.refunds_count,
        row.gross_fen,
        row.refunded_fen,
        row.fee_fen,
        row.hotel_fen,
        row.manufacturer_fen,
        row.suspense_fen,
        row.guarantee_fen,
    )
    if lines_hash(lines) != row.lines_hash:
        raise RuntimeError(f"statement {row.id}: its lines no longer match the issued hash")
    return StatementView(
        hotel.code,
        hotel.name,
        row.period,
        row.granularity,
        row.issued_at,
        totals,
        lines,
        row.lines_hash,
        created,
    )


CSV_COLUMNS = (
    "entry_id",
    "kind",
    "order_id",
    "booked_on",
    "wallet",
    "gross",
    "refunded",
    "fee",
    "hotel_share",
    "manufacturer_share",
    "suspense",
)


def statement_csv(view: StatementView) -> str:
    """The statement as CSV: one row per entry (amounts in yuan), then the totals."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["hotel", view.hotel_code, "period", view.period, "sha256", view.lines_hash])
    writer.writerow(CSV_COLUMNS)
    for line in view.lines:
        writer.writerow(
            [
                line.entry_id,
                line.kind,
                line.order_id or "",
                line.booked_on.isoformat(),
                line.wallet or "",
                *(
                    yuan_str(fen)
                    for fen in (
                        line.gross_fen,
                        line.refunded_fen,
                        line.fee_fen,
                        line.hotel_fen,
                        line.manufacturer_fen,
                        line.suspense_fen,
                    )
                ),
            ]
        )
    t = view.totals
    writer.writerow(
        [
            "total",
            f"orders={t.orders} refunds={t.refunds}",
            "",
            "",
            "",
            *(
                yuan_str(fen)
                for fen in (
                    t.gross_fen,
                    t.refunded_fen,
                    t.fee_fen,
                    t.hotel_fen,
                    t.manufacturer_fen,
                    t.suspense_fen,
                )
            ),
        ]
    )
    if t.guarantee_fen:
        writer.writerow(["guarantee_topup", "", "", "", "", "", "", "", yuan_str(t.guarantee_fen)])
    return out.getvalue()

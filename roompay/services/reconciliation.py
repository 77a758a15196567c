"""Reconciliation: a provider's daily bill against the ledger, line by line.

For one Beijing day and one wallet, the bill's payment lines are keyed by
`out_trade_no`, its refund lines by refund key; the ledger's payment and refund
entries of that wallet booked that day by the same keys. Each key falls in one class:

- matched          on both sides, same amount and fee
- orphan           paid at the provider, unknown here (no order, or no payment booked)
- missing          booked here, absent from the provider's bill
- amount_mismatch  on both sides, with a different amount or fee
- status_mismatch  a refund on one side only (refunded here and not there, or the reverse)

A bill line whose key is booked on another day still matches (a payment near
midnight). Payments the bill confirms are marked "funds arrived" on their order,
once. A report is kept per (day, wallet) and version: asking again returns the report
there; `rerun` makes the next version. The bill is fetched outside any transaction.
"""

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date, datetime
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roompay.domain import ledger as rules
from roompay.domain.catalog import Wallet
from roompay.domain.ledger import EntryKind
from roompay.payments.base import BillEntry, BillEntryKind
from roompay.payments.errors import PaymentError
from roompay.services.context import ServiceContext
from roompay.services.errors import conflict, invalid, not_found, unavailable
from roompay.services.ledger import Booked, entries
from roompay.store.db import transaction
from roompay.store.models import (
    LedgerEntry,
    Order,
    OrderFunds,
    ReconciliationLine,
    ReconciliationReport,
)

log = logging.getLogger(__name__)

PAYMENT_KINDS = (EntryKind.PAYMENT.value, EntryKind.PAYMENT_SUSPENSE.value)
REFUND_KINDS = (EntryKind.REFUND.value, EntryKind.REFUND_SUSPENSE.value)


class Outcome(StrEnum):
    """The class a bill line or ledger entry falls in."""

    MATCHED = "matched"
    ORPHAN = "orphan"
    MISSING = "missing"
    AMOUNT_MISMATCH = "amount_mismatch"
    STATUS_MISMATCH = "status_mismatch"


DIFFERENCES = tuple(o for o in Outcome if o is not Outcome.MATCHED)


@dataclass(frozen=True, slots=True)
class Side:
    """One side's view of a payment or refund: amount and fee in fen."""

    amount_fen: int
    fee_fen: int


@dataclass(frozen=True, slots=True)
class ReportLine:
    """A classified key."""

    outcome: Outcome
    kind: str  # payment | refund
    out_trade_no: str
    refund_key: str | None
    ours: Side | None
    theirs: Side | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class ReportView:
    """A stored reconciliation report."""

    bill_date: date
    wallet: str
    version: int
    created_at: datetime
    counts: dict[str, int]
    amounts_fen: dict[str, int]
    lines: list[ReportLine]
    created: bool

    @property
    def differences(self) -> int:
        """How many keys are not matched."""
        return sum(self.counts[o.value] for o in DIFFERENCES)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form."""
        return {
            "bill_date": self.bill_date.isoformat(),
            "wallet": self.wallet,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "counts": self.counts,
            "amounts_fen": self.amounts_fen,
            "differences": self.differences,
            "created": self.created,
            "lines": [
                {
                    **asdict(line),
                    "outcome": line.outcome.value,
                }
                for line in self.lines
            ],
        }


def reconcile(
    ctx: ServiceContext, bill_date: date, wallet: Wallet, *, rerun: bool = False
) -> ReportView:
    """Reconcile one wallet's bill of a finished Beijing day; idempotent unless `rerun`."""
    if bill_date >= rules.beijing_day(ctx.clock.now()):
        raise conflict("day_not_over", f"the bill of {bill_date} is ready the next day")
    if not rerun:
        existing = latest_report(ctx, bill_date, wallet)
        if existing is not None:
            return existing
    try:
        bill = ctx.provider(wallet).fetch_bill(bill_date)
    except KeyError as exc:
        raise invalid("wallet_not_configured", f"{wallet} is not configured") from exc
    except PaymentError as exc:
        raise unavailable("bill_unavailable", f"{wallet} bill of {bill_date}: {exc}") from exc
    try:
        with transaction(ctx.sessions) as session:
            return _record(ctx, session, bill_date, wallet, bill, rerun)
    except IntegrityError:
        # Another reconciler stored this version first: theirs is the report.
        existing = latest_report(ctx, bill_date, wallet)
        if existing is None:
            raise
        return existing


def reconcile_day(ctx: ServiceContext, bill_date: date, *, rerun: bool = False) -> list[ReportView]:
    """Reconcile every configured wallet's bill of a day."""
    if not ctx.providers:
        raise invalid("no_wallets", "no payment provider is configured")
    return [reconcile(ctx, bill_date, wallet, rerun=rerun) for wallet in sorted(ctx.providers)]


def latest_report(ctx: ServiceContext, bill_date: date, wallet: Wallet) -> ReportView | None:
    """The newest report of a day and wallet, if any."""
    with ctx.sessions() as session:
        row = session.scalars(
            select(ReconciliationReport)
            .where(
                ReconciliationReport.bill_date == bill_date,
                ReconciliationReport.wallet == wallet.value,
            )
            .order_by(ReconciliationReport.version.desc())
            .limit(1)
        ).one_or_none()
        return None if row is None else _view(session, row, created=False)


def read_reports(ctx: ServiceContext, bill_date: date) -> list[ReportView]:
    """The newest report of each wallet for a day; not_found when there is none."""
    views = [v for w in sorted(ctx.providers) if (v := latest_report(ctx, bill_date, w))]
    if not views:
        raise not_found("unknown_report", f"no reconciliation of {bill_date}")
    return views


def classify(
    bill: list[BillEntry],
    booked_that_day: list[Booked],
    booked_elsewhere: dict[tuple[str, str], Booked],
    known_orders: set[str],
) -> list[ReportLine]:
    """Classify every key of the bill and of the day's ledger entries."""
    ours: dict[tuple[str, str], Booked] = {_key_of(b): b for b in booked_that_day}
    lines: list[ReportLine] = []
    seen: set[tuple[str, str]] = set()
    for item in bill:
        key = (
            ("refund", item.refund_key or "")
            if item.kind is BillEntryKind.REFUND
            else ("payment", item.out_trade_no)
        )
        seen.add(key)
        theirs = Side(item.amount_fen, item.fee_fen)
        booked = ours.get(key) or booked_elsewhere.get(key)
        refund_key = item.refund_key if item.kind is BillEntryKind.REFUND else None
        if booked is None:
            if item.kind is BillEntryKind.REFUND and item.out_trade_no in known_orders:
                outcome, note = Outcome.STATUS_MISMATCH, "refunded at the provider, not here"
            elif item.out_trade_no in known_orders:
                outcome, note = Outcome.ORPHAN, "the order exists but no payment is booked"
            else:
                outcome, note = Outcome.ORPHAN, "no such order here"
            lines.append(
                ReportLine(outcome, key[0], item.out_trade_no, refund_key, None, theirs, note)
            )
            continue
        side = _side(booked)
        outcome = Outcome.MATCHED if side == theirs else Outcome.AMOUNT_MISMATCH
        note = "" if key in ours else f"booked on {booked.entry.booked_on.isoformat()}"
        lines.append(ReportLine(outcome, key[0], item.out_trade_no, refund_key, side, theirs, note))
    for key, booked in ours.items():
        if key in seen:
            continue
        if key[0] == "refund":
            outcome, note = Outcome.STATUS_MISMATCH, "refunded here, not at the provider"
        else:
            outcome, note = Outcome.MISSING, "not in the provider's bill"
        refund_key = key[1] if key[0] == "refund" else None
        lines.append(
            ReportLine(
                outcome, key[0], booked.entry.order_id or "", refund_key, _side(booked), None, note
            )
        )
    return lines


def _key_of(booked: Booked) -> tuple[str, str]:
    if booked.entry.kind in REFUND_KINDS:
        return ("refund", booked.entry.source_key)
    return ("payment", booked.entry.order_id or booked.entry.source_key)


def _side(booked: Booked) -> Side:
    money = sum(
        line.signed_fen
        for line in booked.lines
        if line.account.startswith(("clearing:", "provider_fees:"))
    )
    fee = sum(line.signed_fen for line in booked.lines if line.account.startswith("provider_fees:"))
    return Side(abs(money), fee)


def _record(
    ctx: ServiceContext,
    session: Session,
    bill_date: date,
    wallet: Wallet,
    bill: list[BillEntry],
    rerun: bool,
) -> ReportView:
    latest = session.scalar(
        select(func.max(ReconciliationReport.version)).where(
            ReconciliationReport.bill_date == bill_date,
            ReconciliationReport.wallet == wallet.value,
        )
    )
    if latest is not None and not rerun:
        row = session.scalars(
            select(ReconciliationReport).where(
                ReconciliationReport.bill_date == bill_date,
                ReconciliationReport.wallet == wallet.value,
                ReconciliationReport.version == latest,
            )
        ).one()
        return _view(session, row, created=False)
    day_entries = entries(
        session,
        LedgerEntry.wallet == wallet.value,
        LedgerEntry.booked_on == bill_date,
        LedgerEntry.kind.in_(PAYMENT_KINDS + REFUND_KINDS),
    )
    elsewhere = _booked_for(session, wallet, bill, bill_date)
    trade_nos = {item.out_trade_no for item in bill}
    known = (
        set(session.scalars(select(Order.id).where(Order.id.in_(trade_nos))))
        if trade_nos
        else set()
    )
    lines = classify(bill, day_entries, elsewhere, known)
    now = ctx.clock.now()
    counts, amounts = _summary(lines)
    row = ReconciliationReport(
        bill_date=bill_date,
        wallet=wallet.value,
        version=(latest or 0) + 1,
        created_at=now,
        summary={"counts": counts, "amounts_fen": amounts},
    )
    session.add(row)
    session.flush()
    session.add_all(
        ReconciliationLine(
            report_id=row.id,
            outcome=line.outcome.value,
            kind=line.kind,
            out_trade_no=line.out_trade_no[:64],
            refund_key=line.refund_key[:64] if line.refund_key else None,
            ours_fen=line.ours.amount_fen if line.ours else None,
            theirs_fen=line.theirs.amount_fen if line.theirs else None,
            our_fee_fen=line.ours.fee_fen if line.ours else None,
            their_fee_fen=line.theirs.fee_fen if line.theirs else None,
            note=line.note[:200],
        )
        for line in lines
    )
    confirmed = [
        line.out_trade_no
        for line in lines
        if line.kind == "payment" and line.outcome is Outcome.MATCHED
    ]
    _mark_funds_arrived(session, confirmed, wallet, bill_date, row.id, now)
    session.flush()
    log.info("reconciled %s %s v%d: %s", wallet.value, bill_date, row.version, counts)
    return ReportView(bill_date, wallet.value, row.version, now, counts, amounts, lines, True)


def _booked_for(
    session: Session, wallet: Wallet, bill: list[BillEntry], bill_date: date
) -> dict[tuple[str, str], Booked]:
    """Ledger entries of the bill's keys booked on other days."""
    payments = [i.out_trade_no for i in bill if i.kind is BillEntryKind.PAYMENT]
    refunds = [i.refund_key for i in bill if i.kind is BillEntryKind.REFUND and i.refund_key]
    found: list[Booked] = []
    if payments:
        found += entries(
            session,
            LedgerEntry.wallet == wallet.value,
            LedgerEntry.kind.in_(PAYMENT_KINDS),
            LedgerEntry.order_id.in_(payments),
            LedgerEntry.booked_on != bill_date,
        )
    if refunds:
        found += entries(
            session,
            LedgerEntry.wallet == wallet.value,
            LedgerEntry.kind.in_(REFUND_KINDS),
            LedgerEntry.source_key.in_(refunds),
            LedgerEntry.booked_on != bill_date,
        )
    return {_key_of(b): b for b in found}


def _summary(lines: list[ReportLine]) -> tuple[dict[str, int], dict[str, int]]:
    counts = Counter(line.outcome.value for line in lines)
    amounts: Counter[str] = Counter()
    for line in lines:
        side = line.theirs or line.ours
        amounts[line.outcome.value] += side.amount_fen if side else 0
    return (
        {o.value: counts.get(o.value, 0) for o in Outcome},
        {o.value: amounts.get(o.value, 0) for o in Outcome},
    )


def _mark_funds_arrived(
    session: Session,
    order_ids: list[str],
    wallet: Wallet,
    bill_date: date,
    report_id: int,
    now: datetime,
) -> None:
    """Mark orders whose payment the bill confirmed; a mark already there stays as it is."""
    if not order_ids:
        return
    rows = [
        {
            "order_id": order_id,
            "wallet": wallet.value,
            "bill_date": bill_date,
            "report_id": report_id,
            "confirmed_at": now,
        }
        for order_id in order_ids
    ]
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(OrderFunds).values(rows).on_conflict_do_nothing())


def funds_arrived(session: Session, order_id: str) -> bool:
    """Tell whether a provider's bill confirmed this order's payment."""
    return session.get(OrderFunds, order_id) is not None


def _view(session: Session, row: ReconciliationReport, created: bool) -> ReportView:
    stored = session.scalars(
        select(ReconciliationLine)
        .where(ReconciliationLine.report_id == row.id)
        .order_by(ReconciliationLine.id)
    )
    lines = [
        ReportLine(
            Outcome(r.outcome),
            r.kind,
            r.out_trade_no,
            r.refund_key,
            None if r.ours_fen is None else Side(r.ours_fen, r.our_fee_fen or 0),
            None if r.theirs_fen is None else Side(r.theirs_fen, r.their_fee_fen or 0),
            r.note,
        )
        for r in stored
    ]
    summary = row.summary
    return ReportView(
        row.bill_date,
        row.wallet,
        row.version,
        row.created_at,
        dict(summary["counts"]),
        dict(summary["amounts_fen"]),
        lines,
        created,
    )

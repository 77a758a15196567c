"""Posting money events into the ledger, inside the caller's transaction.

The payment entry is written by the transaction that marks the order paid, the
refund entry by the one that records the provider's confirmation; both run under
the order's row lock. Every entry is unique per (kind, source key), so a repeated
cause finds its entry and writes nothing. Entries and lines are never updated or
deleted: a correction is a new entry.
"""

import logging
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import ColumnElement, Connection, func, select
from sqlalchemy.orm import Session

from roompay.domain import ledger as rules
from roompay.domain.ledger import EntryKind, FeeSchedule, HotelContract, Line, Posting
from roompay.store import hot_path
from roompay.store.models import HotelContract as ContractRow
from roompay.store.models import LedgerEntry, LedgerLine, Order, ProviderFeeSchedule, Refund

log = logging.getLogger(__name__)

DEFAULT_CONTRACT = HotelContract(rules.EPOCH, 3000, rules.ShareBasis.GROSS, 0)


def add_contract(
    session: Session, hotel_id: int, contract: HotelContract, now: datetime
) -> ContractRow:
    """Give a hotel new terms from `contract.effective_from` on (earlier money keeps its terms)."""
    row = ContractRow(
        hotel_id=hotel_id,
        effective_from=contract.effective_from,
        share_bp=contract.share_bp,
        basis=contract.basis.value,
        min_monthly_guarantee_fen=contract.min_monthly_guarantee_fen,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row


def hotel_contracts(session: Session, hotel_id: int) -> list[HotelContract]:
    """Every contract a hotel ever had.

    Read without autoflush: a payment's transaction has the order and its outbox rows
    pending, and flushing them here only to read contracts cost a flush of its own.
    """
    with session.no_autoflush:
        rows = session.scalars(select(ContractRow).where(ContractRow.hotel_id == hotel_id)).all()
    return [
        HotelContract(
            r.effective_from, r.share_bp, rules.ShareBasis(r.basis), r.min_monthly_guarantee_fen
        )
        for r in rows
    ]


def contract_on(session: Session, hotel_id: int, day: date) -> HotelContract:
    """The hotel's contract in force on `day`."""
    return rules.in_force(hotel_contracts(session, hotel_id), day)


def fees_on(session: Session, wallet: str, day: date) -> FeeSchedule:
    """The provider's fee schedule in force on `day` (read without autoflush, as above)."""
    with session.no_autoflush:
        rows = session.scalars(
            select(ProviderFeeSchedule).where(ProviderFeeSchedule.wallet == wallet)
        ).all()
    return rules.in_force(
        [
            FeeSchedule(r.effective_from, r.rate_bp, rules.RefundFeeRule(r.refund_rule))
            for r in rows
        ],
        day,
    )


@dataclass(frozen=True, slots=True)
class Booked:
    """An entry as stored, with its lines."""

    entry: LedgerEntry
    lines: tuple[Line, ...]


def post(
    session: Session,
    posting: Posting,
    *,
    now: datetime,
    occurred_at: datetime,
    hotel_id: int,
    order_id: str | None,
    wallet: str | None,
    booked_on: date | None = None,
    first_time: bool = False,
) -> LedgerEntry:
    """Write a balanced entry once; a repeated (kind, source key) returns the entry there.

    `first_time` is for callers whose cause happens once by construction (a payment:
    the order moved to paid under its row lock): the lookup is skipped, and the unique
    (kind, source key) would still refuse a second entry.
    """
    existing = None if first_time else find_entry(session, posting.kind, posting.source_key)
    if existing is not None:
        return existing
    entry = LedgerEntry(
        **_entry_row(posting, now, occurred_at, hotel_id, order_id, wallet, booked_on)
    )
    session.add(entry)
    session.flush()
    session.add_all(LedgerLine(**row) for row in _line_rows(entry.id, posting))
    session.flush()
    return entry


def insert_entry(
    connection: Connection,
    posting: Posting,
    *,
    now: datetime,
    occurred_at: datetime,
    hotel_id: int,
    order_id: str | None,
    wallet: str | None,
) -> int:
    """Write a new balanced entry with two statements and no ORM; return its id.

    For a cause that happens once by construction (a payment, under the order's row
    lock); the unique (kind, source key) refuses a second entry all the same.
    """
    row = _entry_row(posting, now, occurred_at, hotel_id, order_id, wallet, None)
    entry_id = connection.execute(hot_path.INSERT_ENTRY, row).scalar_one()
    connection.execute(hot_path.INSERT_LINES, _line_rows(entry_id, posting))
    return int(entry_id)


def entry_rows(
    posting: Posting,
    *,
    now: datetime,
    occurred_at: datetime,
    hotel_id: int,
    order_id: str | None,
    wallet: str | None,
) -> tuple[dict[str, object], list[dict[str, object]]]:
    """A new entry's row and its lines' rows (without `entry_id`), for one statement that
    writes both (`hot_path.payment_writes`)."""
    entry = _entry_row(posting, now, occurred_at, hotel_id, order_id, wallet, None)
    lines = [
        {"account": line.account, "debit_fen": line.debit_fen, "credit_fen": line.credit_fen}
        for line in posting.lines
    ]
    return entry, lines


def _entry_row(
    posting: Posting,
    now: datetime,
    occurred_at: datetime,
    hotel_id: int,
    order_id: str | None,
    wallet: str | None,
    booked_on: date | None,
) -> dict[str, object]:
    return {
        "kind": posting.kind.value,
        "source_key": posting.source_key,
        "posted_at": now,
        "occurred_at": occurred_at,
        "booked_on": booked_on or rules.beijing_day(occurred_at),
        "order_id": order_id,
        "hotel_id": hotel_id,
        "wallet": wallet,
    }


def _line_rows(entry_id: int, posting: Posting) -> list[dict[str, object]]:
    return [
        {
            "entry_id": entry_id,
            "account": line.account,
            "debit_fen": line.debit_fen,
            "credit_fen": line.credit_fen,
        }
        for line in posting.lines
    ]


def find_entry(session: Session, kind: EntryKind, source_key: str) -> LedgerEntry | None:
    """The entry of one cause, if it was posted."""
    return session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.kind == kind.value, LedgerEntry.source_key == source_key
        )
    ).one_or_none()


def post_payment(session: Session, order: Order, now: datetime, *, suspense: bool) -> LedgerEntry:
    """Book a paid order; `suspense` for money that must go back (flagged or late).

    The caller has just moved the order to paid under its row lock, which happens
    once per order: the entry cannot exist yet.
    """
    paid_fen = order.paid_amount_fen if order.paid_amount_fen is not None else order.amount_fen
    paid_at = order.paid_at or now
    day = rules.beijing_day(paid_at)
    fees = fees_on(session, order.wallet, day)
    if suspense:
        posting = rules.suspense_payment_posting(order.id, order.wallet, paid_fen, fees)
    else:
        contract = contract_on(session, order.hotel_id, day)
        posting = rules.payment_posting(
            order.id, order.wallet, order.hotel_id, paid_fen, fees, contract
        )
    return post(
        session,
        posting,
        now=now,
        occurred_at=paid_at,
        hotel_id=order.hotel_id,
        order_id=order.id,
        wallet=order.wallet,
        first_time=True,
    )


def post_refund(session: Session, refund: Refund, now: datetime) -> LedgerEntry | None:
    """Book a refund the provider confirmed, under the terms the payment was booked with.

    Returns None, and logs, for an order whose payment is not in the books (paid
    before the ledger existed): the guest's refund must not wait for bookkeeping.
    """
    order = session.get_one(Order, refund.order_id, with_for_update=True)
    payment = _payment_entry(session, order.id)
    if payment is None:
        log.error("refund %s: the order's payment is not in the ledger", refund.refund_key)
        return None
    fees = fees_on(session, order.wallet, payment.booked_on)
    before = order_money(session, order.id)
    if payment.kind == EntryKind.PAYMENT_SUSPENSE:
        posting = rules.suspense_refund_posting(
            refund.refund_key, order.wallet, before, refund.amount_fen, fees
        )
    else:
        contract = contract_on(session, order.hotel_id, payment.booked_on)
        posting = rules.refund_posting(
            refund.refund_key,
            order.wallet,
            order.hotel_id,
            before,
            refund.amount_fen,
            fees,
            contract,
        )
    return post(
        session,
        posting,
        now=now,
        occurred_at=now,
        hotel_id=order.hotel_id,
        order_id=order.id,
        wallet=order.wallet,
    )


def _payment_entry(session: Session, order_id: str) -> LedgerEntry | None:
    return session.scalars(
        select(LedgerEntry).where(
            LedgerEntry.order_id == order_id,
            LedgerEntry.kind.in_((EntryKind.PAYMENT.value, EntryKind.PAYMENT_SUSPENSE.value)),
        )
    ).one_or_none()


def order_money(session: Session, order_id: str) -> rules.OrderMoney:
    """What the books say of an order: paid, refunded and the net fee, in fen."""
    paid = refunded = fee = 0
    for booked in entries(session, LedgerEntry.order_id == order_id):
        money = sum(
            line.signed_fen
            for line in booked.lines
            if line.account.startswith(("clearing:", "provider_fees:"))
        )
        if booked.entry.kind in (EntryKind.PAYMENT, EntryKind.PAYMENT_SUSPENSE):
            paid += money
        else:
            refunded -= money
        fee += sum(
            line.signed_fen for line in booked.lines if line.account.startswith("provider_fees:")
        )
    return rules.OrderMoney(paid, refunded, fee)


def entries(session: Session, *where: ColumnElement[bool]) -> list[Booked]:
    """Entries matching the conditions, oldest first, each with its lines."""
    rows = list(session.scalars(select(LedgerEntry).where(*where).order_by(LedgerEntry.id)))
    if not rows:
        return []
    lines: dict[int, list[Line]] = {row.id: [] for row in rows}
    for chunk_start in range(0, len(rows), 500):
        ids = [row.id for row in rows[chunk_start : chunk_start + 500]]
        for line in session.scalars(
            select(LedgerLine).where(LedgerLine.entry_id.in_(ids)).order_by(LedgerLine.id)
        ):
            lines[line.entry_id].append(Line(line.account, line.debit_fen, line.credit_fen))
    return [Booked(row, tuple(lines[row.id])) for row in rows]


def account_balances(session: Session) -> dict[str, int]:
    """Every account's balance (debit positive), straight from the lines."""
    rows = session.execute(
        select(
            LedgerLine.account,
            func.sum(LedgerLine.debit_fen) - func.sum(LedgerLine.credit_fen),
        ).group_by(LedgerLine.account)
    )
    return {account: int(total) for account, total in rows if int(total) != 0}


def unbalanced_entries(session: Session) -> list[int]:
    """Ids of entries whose debits and credits differ (there must be none)."""
    rows = session.execute(
        select(LedgerLine.entry_id)
        .group_by(LedgerLine.entry_id)
        .having(func.sum(LedgerLine.debit_fen) != func.sum(LedgerLine.credit_fen))
    )
    return [int(entry_id) for (entry_id,) in rows]

"""After the load: did every order end as the payments and devices issues say it must?

Speed that loses or invents money is no speed. Once every phase has run and every run
has ended, the bench reads its scratch database and counts what would break the
invariants (research/reliability.md §1) for the orders it paid: each paid order booked
once in the ledger, run exactly once (the bench's appliances accept every start, so a
refund is a failure here too) and no longer in flight (paid or running: every run was
ended); no run without a payment; every ledger entry balanced and the accounts
summing to zero.
"""

from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from roompay.domain.ledger import EntryKind
from roompay.domain.orders import OrderStatus
from roompay.services.ledger import account_balances, unbalanced_entries
from roompay.store.db import make_engine, session_factory
from roompay.store.models import LedgerEntry, Order, RunEventRecord

VIOLATIONS = (
    "paid_not_booked_once",
    "paid_not_run_once",
    "paid_in_flight",
    "run_without_payment",
    "unbalanced_entries",
    "ledger_sum_fen",
)
"""The counts that must all be zero."""


def audit(database_url: str) -> dict[str, Any]:
    """The invariants' counts over every order in the database (see the module)."""
    engine = make_engine(database_url, pool_size=1)
    try:
        with session_factory(engine)() as session:
            return _counts(session)
    finally:
        engine.dispose()


def _counts(session: Session) -> dict[str, Any]:
    paid = Order.paid_at.is_not(None)
    orders = session.execute(select(Order.id, Order.status, paid)).all()
    paid_ids = {order_id for order_id, _status, is_paid in orders if is_paid}
    runs: dict[str, int] = dict(
        session.execute(
            select(RunEventRecord.order_id, func.count(distinct(RunEventRecord.run_id)))
            .where(RunEventRecord.event == "started")
            .group_by(RunEventRecord.order_id)
        ).all()
    )
    booked: dict[str | None, int] = dict(
        session.execute(
            select(LedgerEntry.order_id, func.count())
            .where(LedgerEntry.kind == EntryKind.PAYMENT.value)
            .group_by(LedgerEntry.order_id)
        ).all()
    )
    in_flight = {OrderStatus.PAID.value, OrderStatus.RUNNING.value}
    return {
        "orders": len(orders),
        "paid": len(paid_ids),
        "paid_not_booked_once": sum(1 for order_id in paid_ids if booked.get(order_id) != 1),
        "paid_not_run_once": sum(1 for order_id in paid_ids if runs.get(order_id) != 1),
        "paid_in_flight": sum(
            1 for _id, status, is_paid in orders if is_paid and status in in_flight
        ),
        "run_without_payment": sum(1 for order_id in runs if order_id not in paid_ids),
        "unbalanced_entries": len(unbalanced_entries(session)),
        "ledger_sum_fen": sum(account_balances(session).values()),
    }


def violations(counts: dict[str, Any]) -> int:
    """How many of the audit's counts broke an invariant (orders, entries or fen)."""
    return sum(1 for name in VIOLATIONS if counts.get(name))

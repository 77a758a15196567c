"""Refunds owed to guests. One row per refund key, so retries never pay twice.

This is the seam the provider refund worker plugs into: it picks up `requested`
refunds, calls the provider with the same key on every retry, and records the
outcome.
"""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from roompay.services.context import ServiceContext
from roompay.services.orders import record_event
from roompay.store.models import Order, Refund


def refunded_total(session: Session, order_id: str) -> int:
    """Fen already owed back on this order, whatever the refunds' progress."""
    total = session.scalar(
        select(func.coalesce(func.sum(Refund.amount_fen), 0)).where(Refund.order_id == order_id)
    )
    return int(total or 0)


def request_refund(
    ctx: ServiceContext, session: Session, order: Order, amount_fen: int, reason: str, key: str
) -> Refund | None:
    """Owe the guest `amount_fen` back, once per key and never more than was paid."""
    existing = session.scalars(select(Refund).where(Refund.refund_key == key)).one_or_none()
    if existing is not None:
        return existing
    room = order.amount_fen - refunded_total(session, order.id)
    amount = min(amount_fen, room)
    if amount <= 0:
        return None
    refund = Refund(
        order_id=order.id,
        refund_key=key,
        amount_fen=amount,
        reason=reason,
        status="requested",
        created_at=ctx.clock.now(),
    )
    session.add(refund)
    record_event(
        session, order.id, ctx.clock.now(), "refund_requested", amount_fen=amount, reason=reason
    )
    return refund

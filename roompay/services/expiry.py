"""Unpaid checkouts: ask the provider actively, and close them when they expire.

Notifications can be late or lost, so the server does not wait for them: an order
awaiting payment is queried `query_after_s` after creation and then every
`query_interval_s` until it expires; at expiry it is queried once more and closed at
the provider, so that it can no longer be paid. A payment found by a query is
applied exactly like a notification.
"""

import logging
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from roompay.domain.catalog import Wallet
from roompay.domain.orders import OrderStatus
from roompay.logs import order_context
from roompay.payments.base import TradeState
from roompay.payments.errors import PaymentError, TradeAlreadyPaidError
from roompay.services.context import ServiceContext
from roompay.services.payments import PaymentEvidence, apply_evidence
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Order

log = logging.getLogger(__name__)


def sweep_unpaid(ctx: ServiceContext, batch: int = 50) -> int:
    """Query or close every unpaid order that is due; return how many were looked at."""
    now = ctx.clock.now()
    due = _due_orders(ctx, now, batch)
    for order_id, wallet, expires_at in due:
        with order_context(order_id):
            try:
                check_unpaid(ctx, order_id, Wallet(wallet), expired=now >= expires_at)
            except PaymentError as exc:
                log.warning("provider check failed, will retry: %s", exc)
    return len(due)


def _due_orders(ctx: ServiceContext, now: datetime, batch: int) -> list[tuple[str, str, datetime]]:
    settings = ctx.settings
    first_query = now - timedelta(seconds=settings.query_after_s)
    next_query = now - timedelta(seconds=settings.query_interval_s)
    with ctx.sessions() as session:
        rows = session.execute(
            select(Order.id, Order.wallet, Order.expires_at)
            .where(
                Order.status == OrderStatus.AWAITING_PAYMENT,
                # An order without a QR is still being created, unless it has expired:
                # then its checkout died half-way (a crash) and it must be closed too.
                or_(Order.qr_content.is_not(None), Order.expires_at <= now),
                Order.created_at <= first_query,
                or_(
                    Order.expires_at <= now,
                    Order.last_queried_at.is_(None),
                    Order.last_queried_at <= next_query,
                ),
            )
            .order_by(Order.expires_at)
            .limit(batch)
        ).all()
    return [(order_id, wallet, expires_at) for order_id, wallet, expires_at in rows]


def check_unpaid(ctx: ServiceContext, order_id: str, wallet: Wallet, expired: bool) -> None:
    """Ask the provider about one unpaid order; apply a payment, or close it if expired."""
    provider = ctx.provider(wallet)
    snapshot = provider.query_trade(order_id)
    if snapshot.state is TradeState.SUCCESS:
        apply_evidence(ctx, PaymentEvidence.from_query(wallet, snapshot, ctx.clock.now()))
        return
    if not expired:
        _mark_queried(ctx, order_id)
        return
    try:
        provider.close_trade(order_id)
    except TradeAlreadyPaidError:
        # Paid between our query and our close: the money is real, apply it.
        paid = provider.query_trade(order_id)
        apply_evidence(ctx, PaymentEvidence.from_query(wallet, paid, ctx.clock.now()))
        return
    _expire(ctx, order_id)


def _mark_queried(ctx: ServiceContext, order_id: str) -> None:
    with transaction(ctx.sessions) as session:
        order = session.get_one(Order, order_id)
        order.last_queried_at = ctx.clock.now()


def _expire(ctx: ServiceContext, order_id: str) -> None:
    with transaction(ctx.sessions) as session:
        order = session.get_one(Order, order_id, with_for_update=True)
        if order.status != OrderStatus.AWAITING_PAYMENT:
            return  # a notification won the race; it stands
        order.status = OrderStatus.EXPIRED.value
        order.closed_at_provider = True
        record_event(session, order_id, ctx.clock.now(), "expired", closed_at_provider=True)
    log.info("checkout expired and closed at the provider")

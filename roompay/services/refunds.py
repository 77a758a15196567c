"""Refunds owed to guests, and their way through the provider.

One refund state machine: requested -> processing -> refunded, or needs_attention
(or cancelled, for a start refund made unnecessary because the appliance did run).
Each refund has one key (`out_refund_no` / `out_request_no`) used on every retry, so
the provider pays it at most once whatever we repeat; the total owed never exceeds
what the guest paid.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from roompay.domain.catalog import Wallet
from roompay.domain.orders import OrderStatus, status_after_refunds
from roompay.logs import order_context
from roompay.payments.base import RefundOutcome, RefundRequest, RefundState
from roompay.payments.errors import PaymentError, ProviderUnavailableError
from roompay.services.context import ServiceContext
from roompay.services.ledger import post_refund
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Order, Refund

log = logging.getLogger(__name__)

BACKOFF_S = (0, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class RefundStatus(StrEnum):
    """Where a refund is."""

    REQUESTED = "requested"
    PROCESSING = "processing"
    REFUNDED = "refunded"
    NEEDS_ATTENTION = "needs_attention"
    CANCELLED = "cancelled"


OPEN = (RefundStatus.REQUESTED.value, RefundStatus.PROCESSING.value)
COUNTED = (*OPEN, RefundStatus.REFUNDED.value, RefundStatus.NEEDS_ATTENTION.value)


def paid_total(order: Order) -> int:
    """What the guest actually paid for this order."""
    return order.paid_amount_fen if order.paid_amount_fen is not None else order.amount_fen


def owed_total(session: Session, order_id: str) -> int:
    """Fen owed back on this order in refunds not cancelled, whatever their progress."""
    total = session.scalar(
        select(func.coalesce(func.sum(Refund.amount_fen), 0)).where(
            Refund.order_id == order_id, Refund.status.in_(COUNTED)
        )
    )
    return int(total or 0)


def refunded_total(session: Session, order_id: str) -> int:
    """Fen the provider has confirmed back to the guest."""
    total = session.scalar(
        select(func.coalesce(func.sum(Refund.amount_fen), 0)).where(
            Refund.order_id == order_id, Refund.status == RefundStatus.REFUNDED
        )
    )
    return int(total or 0)


def request_refund(
    ctx: ServiceContext,
    session: Session,
    order: Order,
    amount_fen: int,
    reason: str,
    key: str,
    requested_by: int | None = None,
    note: str | None = None,
) -> Refund | None:
    """Owe the guest `amount_fen` back, once per key and never more than was paid.

    The caller holds the order's row lock. Returns the refund (the existing one for a
    repeated key), or None when nothing is left to refund.
    """
    existing = session.scalars(select(Refund).where(Refund.refund_key == key)).one_or_none()
    if existing is not None:
        return existing
    room = paid_total(order) - owed_total(session, order.id)
    amount = min(amount_fen, room)
    if amount <= 0:
        return None
    now = ctx.clock.now()
    refund = Refund(
        order_id=order.id,
        refund_key=key,
        amount_fen=amount,
        reason=reason,
        status=RefundStatus.REQUESTED.value,
        created_at=now,
        requested_by=requested_by,
        note=note,
        attempts=0,
        next_attempt_at=now,
    )
    session.add(refund)
    session.flush()
    record_event(
        session, order.id, now, "refund_requested", amount_fen=amount, reason=reason, key=key
    )
    return refund


def cancel_unsent_refund(ctx: ServiceContext, session: Session, key: str) -> bool:
    """Cancel a refund that was never sent to the provider; False if it is on its way."""
    refund = session.scalars(
        select(Refund).where(Refund.refund_key == key).with_for_update()
    ).one_or_none()
    if refund is None or refund.status != RefundStatus.REQUESTED or refund.attempts > 0:
        return False
    refund.status = RefundStatus.CANCELLED.value
    refund.finished_at = ctx.clock.now()
    record_event(session, refund.order_id, ctx.clock.now(), "refund_cancelled", key=key)
    return True


@dataclass(frozen=True, slots=True)
class _Claim:
    refund_id: int
    key: str
    order_id: str
    wallet: Wallet
    amount_fen: int
    total_fen: int
    reason: str
    send: bool  # True: ask for the refund; False: ask where it stands


def process_due_refunds(ctx: ServiceContext, batch: int = 50) -> int:
    """Send or check every refund that is due; return how many were handled."""
    claims = _claim_due(ctx, batch)
    for claim in claims:
        with order_context(claim.order_id):
            _advance(ctx, claim)
    return len(claims)


def _claim_due(ctx: ServiceContext, batch: int) -> list[_Claim]:
    """Lease due refunds: push their next attempt out before calling the provider."""
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        rows = session.execute(
            select(Refund, Order)
            .join(Order, Refund.order_id == Order.id)
            .where(Refund.status.in_(OPEN), Refund.next_attempt_at <= now)
            .order_by(Refund.next_attempt_at)
            .limit(batch)
            .with_for_update(skip_locked=True, of=Refund)
        ).all()
        claims = []
        for refund, order in rows:
            refund.attempts += 1
            delay = BACKOFF_S[min(refund.attempts, len(BACKOFF_S) - 1)]
            refund.next_attempt_at = now + timedelta(seconds=max(delay, 1))
            claims.append(
                _Claim(
                    refund.id,
                    refund.refund_key,
                    order.id,
                    Wallet(order.wallet),
                    refund.amount_fen,
                    order.amount_fen,  # the total the provider knows: the order's, as created
                    refund.reason,
                    refund.status == RefundStatus.REQUESTED,
                )
            )
        return claims


def _advance(ctx: ServiceContext, claim: _Claim) -> None:
    provider = ctx.provider(claim.wallet)
    try:
        if claim.send:
            outcome = provider.refund(
                RefundRequest(
                    claim.order_id,
                    claim.key,
                    claim.amount_fen,
                    claim.total_fen,
                    claim.reason,
                    refund_notify_url(ctx, claim.wallet),
                )
            )
        else:
            outcome = provider.query_refund(claim.order_id, claim.key)
    except ProviderUnavailableError as exc:
        _record_failure(ctx, claim, str(exc), give_up=False)
        return
    except PaymentError as exc:
        _record_failure(ctx, claim, str(exc), give_up=True)
        return
    _apply_outcome(ctx, claim.refund_id, claim.order_id, claim.key, outcome)


def _record_failure(ctx: ServiceContext, claim: _Claim, error: str, give_up: bool) -> None:
    with transaction(ctx.sessions) as session:
        refund = session.get_one(Refund, claim.refund_id, with_for_update=True)
        refund.last_error = error[:200]
        if give_up or refund.attempts >= ctx.settings.refund_max_attempts:
            refund.status = RefundStatus.NEEDS_ATTENTION.value
            record_event(
                session,
                claim.order_id,
                ctx.clock.now(),
                "refund_needs_attention",
                key=claim.key,
                error=error[:200],
            )
    log.warning("refund %s not done: %s", claim.key, error)


def refund_notify_url(ctx: ServiceContext, wallet: Wallet) -> str | None:
    """Where a provider that notifies refund results should send them (WeChat Pay does)."""
    if wallet is not Wallet.WECHAT:
        return None  # Alipay refunds succeed synchronously
    return f"{ctx.settings.public_base_url}/api/v1/notify/wechatpay/refund"


def apply_refund_notice(ctx: ServiceContext, outcome: RefundOutcome) -> bool:
    """Apply a provider's refund-result notification; False if the key is not ours."""
    with ctx.sessions() as session:
        found = session.execute(
            select(Refund.id, Refund.order_id).where(Refund.refund_key == outcome.refund_key)
        ).first()
    if found is None:
        log.warning("refund notify for an unknown refund key %s", outcome.refund_key)
        return False
    refund_id, order_id = found
    with order_context(order_id):
        _apply_outcome(ctx, refund_id, order_id, outcome.refund_key, outcome)
    return True


def _apply_outcome(
    ctx: ServiceContext, refund_id: int, order_id: str, key: str, outcome: RefundOutcome
) -> None:
    """Record what the provider says about a refund; repeated or stale news changes nothing."""
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        refund = session.get_one(Refund, refund_id, with_for_update=True)
        if refund.status not in OPEN:
            return
        if outcome.provider_refund_id:
            refund.provider_refund_id = outcome.provider_refund_id
        if outcome.state is RefundState.SUCCESS:
            refund.status = RefundStatus.REFUNDED.value
            refund.finished_at = now
            record_event(
                session,
                order_id,
                now,
                "refunded",
                key=key,
                amount_fen=refund.amount_fen,
            )
            post_refund(session, refund, now)
            settle_order_status(session, order_id)
        elif outcome.state is RefundState.PROCESSING:
            refund.status = RefundStatus.PROCESSING.value
        elif outcome.state is RefundState.NOT_FOUND:
            refund.status = (
                RefundStatus.REQUESTED.value
            )  # never reached the provider: send it again
        else:
            refund.status = RefundStatus.NEEDS_ATTENTION.value
            record_event(
                session,
                order_id,
                now,
                "refund_needs_attention",
                key=key,
                error="abnormal",
            )


def settle_order_status(session: Session, order_id: str) -> None:
    """Move the order to refunded / partially refunded as far as its confirmed refunds go."""
    order = session.get_one(Order, order_id, with_for_update=True)
    current = OrderStatus(order.status)
    target = status_after_refunds(current, paid_total(order), refunded_total(session, order_id))
    if target is not current:
        order.status = target.value

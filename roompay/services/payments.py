"""Payment notifications: verified money in, turned into a paid order and a start command.

The paid transition, the notice record and the outbox command commit in one
transaction, under a row lock on the order; only then is the provider answered.
Duplicates and concurrent copies therefore have the effect of one.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy.orm import Session

from roompay.domain.orders import OrderStatus, can_move
from roompay.logs import order_context
from roompay.payments.base import PaymentNotification, TradeState
from roompay.protocol.messages import StartCommand
from roompay.services.context import ServiceContext
from roompay.services.orders import record_event
from roompay.store.db import transaction
from roompay.store.models import Command, Device, Order, PaymentNotice

log = logging.getLogger(__name__)


class NotifyOutcome(StrEnum):
    """What a notification did."""

    PAID = "paid"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"
    NOT_A_PAYMENT = "not_a_payment"
    REJECTED_MERCHANT = "rejected_merchant"
    REJECTED_AMOUNT = "rejected_amount"
    REJECTED_WALLET = "rejected_wallet"


ACCEPTED = frozenset(
    {NotifyOutcome.PAID, NotifyOutcome.DUPLICATE, NotifyOutcome.ORPHAN, NotifyOutcome.NOT_A_PAYMENT}
)


@dataclass(frozen=True, slots=True)
class NotifyResult:
    """The outcome, and whether the provider should be told it was handled."""

    outcome: NotifyOutcome

    @property
    def acknowledge(self) -> bool:
        """Tell whether to answer the provider with its success reply."""
        return self.outcome in ACCEPTED


def handle_notification(ctx: ServiceContext, notice: PaymentNotification) -> NotifyResult:
    """Apply a verified payment notification exactly once."""
    with order_context(notice.out_trade_no):
        if not notice.merchant_ok:
            log.warning("notification for another merchant or app refused")
            return NotifyResult(NotifyOutcome.REJECTED_MERCHANT)
        with transaction(ctx.sessions) as session:
            # _apply writes nothing for a refused notification.
            outcome = _apply(ctx, session, notice)
        if outcome in {NotifyOutcome.REJECTED_AMOUNT, NotifyOutcome.REJECTED_WALLET}:
            log.warning("notification refused: %s", outcome)
            return NotifyResult(outcome)
        if outcome is NotifyOutcome.PAID:
            ctx.on_commands_queued()
        log.info("notification handled: %s", outcome)
        return NotifyResult(outcome)


def _apply(ctx: ServiceContext, session: Session, notice: PaymentNotification) -> NotifyOutcome:
    order = session.get(Order, notice.out_trade_no, with_for_update=True)
    if order is None:
        _remember(ctx, session, notice, None, NotifyOutcome.ORPHAN)
        return NotifyOutcome.ORPHAN
    if order.wallet != notice.wallet.value:
        return NotifyOutcome.REJECTED_WALLET
    if notice.amount_fen != order.amount_fen:
        return NotifyOutcome.REJECTED_AMOUNT
    if notice.state is not TradeState.SUCCESS:
        _remember(ctx, session, notice, order.id, NotifyOutcome.NOT_A_PAYMENT)
        return NotifyOutcome.NOT_A_PAYMENT
    if not can_move(OrderStatus(order.status), OrderStatus.PAID):
        return NotifyOutcome.DUPLICATE
    _mark_paid(ctx, session, order, notice)
    _remember(ctx, session, notice, order.id, NotifyOutcome.PAID)
    return NotifyOutcome.PAID


def _remember(
    ctx: ServiceContext,
    session: Session,
    notice: PaymentNotification,
    order_id: str | None,
    outcome: NotifyOutcome,
) -> None:
    session.add(
        PaymentNotice(
            wallet=notice.wallet.value,
            notification_id=notice.notification_id,
            out_trade_no=notice.out_trade_no,
            provider_trade_no=notice.provider_trade_no,
            amount_fen=notice.amount_fen,
            trade_state=notice.state.value,
            order_id=order_id,
            outcome=outcome.value,
            received_at=ctx.clock.now(),
        )
    )


def _mark_paid(
    ctx: ServiceContext, session: Session, order: Order, notice: PaymentNotification
) -> None:
    now = ctx.clock.now()
    late = order.status == OrderStatus.EXPIRED
    order.status = OrderStatus.PAID.value
    order.paid_at = notice.paid_at or now
    order.provider_trade_no = notice.provider_trade_no
    record_event(
        session, order.id, now, "paid", provider_trade_no=notice.provider_trade_no, late=late
    )
    queue_start(ctx, session, order)


def queue_start(ctx: ServiceContext, session: Session, order: Order) -> Command:
    """Write the start command for a paid order into the outbox."""
    now = ctx.clock.now()
    deadline = now + timedelta(seconds=ctx.settings.start_deadline_s)
    device = session.get_one(Device, order.device_id)
    command = StartCommand(
        v=1,
        cmd_id=ctx.ids.token(12),
        order_id=order.id,
        program=order.program_code,
        duration_s=order.duration_s,
        issued_at=now,
        expires_at=deadline,
    )
    row = Command(
        id=command.cmd_id,
        order_id=order.id,
        device_id=device.id,
        kind="start",
        status="pending",
        payload=command.model_dump(mode="json"),
        attempts=0,
        created_at=now,
        next_attempt_at=now,
        deadline_at=deadline,
    )
    session.add(row)
    record_event(session, order.id, now, "command_queued", cmd_id=command.cmd_id)
    return row

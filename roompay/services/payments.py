"""Payment evidence (notifications and active queries) turned into paid orders.

Whatever the source, the paid transition, the notice record and the outbox command
(or the refund owed) commit in one transaction under a row lock on the order; only
then is the provider answered. Duplicates, concurrent copies and a query racing a
notification therefore have the effect of one.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from roompay.domain.catalog import Wallet
from roompay.domain.orders import OrderStatus, can_move
from roompay.logs import order_context
from roompay.payments.base import PaymentNotification, TradeSnapshot, TradeState
from roompay.protocol.messages import StartCommandBody, StopCommandBody
from roompay.protocol.signing import device_key, sign_command
from roompay.services.context import ServiceContext
from roompay.services.ledger import post_payment
from roompay.services.refunds import request_refund
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Command, Device, Order, PaymentNotice

log = logging.getLogger(__name__)


class NotifyOutcome(StrEnum):
    """What a piece of payment evidence did."""

    PAID = "paid"
    PAID_LATE_REFUNDING = "paid_late_refunding"
    FLAGGED_AMOUNT = "flagged_amount"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"
    NOT_A_PAYMENT = "not_a_payment"
    REJECTED_MERCHANT = "rejected_merchant"
    REJECTED_WALLET = "rejected_wallet"


REFUSED = frozenset({NotifyOutcome.REJECTED_MERCHANT, NotifyOutcome.REJECTED_WALLET})


@dataclass(frozen=True, slots=True)
class PaymentEvidence:
    """A provider's word that a trade is in some state, from a notify or a query."""

    wallet: Wallet
    out_trade_no: str
    provider_trade_no: str
    state: TradeState
    amount_fen: int
    paid_at: datetime | None
    source_id: str

    @classmethod
    def from_notification(cls, notice: PaymentNotification) -> "PaymentEvidence":
        """Evidence from a verified notification."""
        return cls(
            notice.wallet,
            notice.out_trade_no,
            notice.provider_trade_no,
            notice.state,
            notice.amount_fen,
            notice.paid_at,
            notice.notification_id,
        )

    @classmethod
    def from_query(cls, wallet: Wallet, snapshot: TradeSnapshot, at: datetime) -> "PaymentEvidence":
        """Evidence from an active query of a paid trade."""
        return cls(
            wallet,
            snapshot.out_trade_no,
            snapshot.provider_trade_no or "",
            snapshot.state,
            snapshot.amount_fen or 0,
            snapshot.paid_at,
            f"query:{at.isoformat()}",
        )


@dataclass(frozen=True, slots=True)
class NotifyResult:
    """The outcome, and whether the provider should be told it was handled."""

    outcome: NotifyOutcome

    @property
    def acknowledge(self) -> bool:
        """Tell whether to answer the provider with its success reply."""
        return self.outcome not in REFUSED


def handle_notification(ctx: ServiceContext, notice: PaymentNotification) -> NotifyResult:
    """Apply a verified payment notification exactly once."""
    with order_context(notice.out_trade_no):
        if not notice.merchant_ok:
            log.warning("notification for another merchant or app refused")
            return NotifyResult(NotifyOutcome.REJECTED_MERCHANT)
        return NotifyResult(apply_evidence(ctx, PaymentEvidence.from_notification(notice)))


def apply_evidence(ctx: ServiceContext, evidence: PaymentEvidence) -> NotifyOutcome:
    """Apply payment evidence in its own transaction and log the outcome."""
    with transaction(ctx.sessions) as session:
        outcome = _apply(ctx, session, evidence)
    if outcome in REFUSED:
        log.warning("payment evidence refused: %s", outcome)
    else:
        log.info("payment evidence handled: %s", outcome)
    if outcome is NotifyOutcome.PAID:
        ctx.on_commands_queued()
    elif outcome in (NotifyOutcome.PAID_LATE_REFUNDING, NotifyOutcome.FLAGGED_AMOUNT):
        ctx.on_refunds_queued()
    return outcome


def _apply(ctx: ServiceContext, session: Session, evidence: PaymentEvidence) -> NotifyOutcome:
    order = session.get(Order, evidence.out_trade_no, with_for_update=True)
    if order is None:
        if not _orphan_known(session, evidence):
            _remember(ctx, session, evidence, None, NotifyOutcome.ORPHAN)
        return NotifyOutcome.ORPHAN
    if order.wallet != evidence.wallet.value:
        return NotifyOutcome.REJECTED_WALLET  # writes nothing
    if evidence.state is not TradeState.SUCCESS:
        _remember(ctx, session, evidence, order.id, NotifyOutcome.NOT_A_PAYMENT)
        return NotifyOutcome.NOT_A_PAYMENT
    if not can_move(OrderStatus(order.status), OrderStatus.PAID):
        return NotifyOutcome.DUPLICATE
    outcome = _mark_paid(ctx, session, order, evidence)
    _remember(ctx, session, evidence, order.id, outcome)
    return outcome


def _orphan_known(session: Session, evidence: PaymentEvidence) -> bool:
    """Tell whether this unknown trade is already kept, so duplicates keep it once."""
    kept = session.scalar(
        select(PaymentNotice.id)
        .where(
            PaymentNotice.wallet == evidence.wallet.value,
            PaymentNotice.out_trade_no == evidence.out_trade_no,
            PaymentNotice.order_id.is_(None),
        )
        .limit(1)
    )
    return kept is not None


def _remember(
    ctx: ServiceContext,
    session: Session,
    evidence: PaymentEvidence,
    order_id: str | None,
    outcome: NotifyOutcome,
) -> None:
    session.add(
        PaymentNotice(
            wallet=evidence.wallet.value,
            notification_id=evidence.source_id[:128],
            out_trade_no=evidence.out_trade_no,
            provider_trade_no=evidence.provider_trade_no,
            amount_fen=evidence.amount_fen,
            trade_state=evidence.state.value,
            order_id=order_id,
            outcome=outcome.value,
            received_at=ctx.clock.now(),
        )
    )


def _mark_paid(
    ctx: ServiceContext, session: Session, order: Order, evidence: PaymentEvidence
) -> NotifyOutcome:
    now = ctx.clock.now()
    late = order.status == OrderStatus.EXPIRED
    order.status = OrderStatus.PAID.value
    order.paid_at = evidence.paid_at or now
    order.paid_amount_fen = evidence.amount_fen
    order.provider_trade_no = evidence.provider_trade_no
    record_event(
        session,
        order.id,
        now,
        "paid",
        provider_trade_no=evidence.provider_trade_no,
        late=late,
        source="query" if evidence.source_id.startswith("query:") else "notify",
    )
    if evidence.amount_fen != order.amount_fen:
        # Authentic money, but not what we asked for: never run, flag, give it back.
        order.flag = "amount_mismatch"
        record_event(
            session,
            order.id,
            now,
            "flagged",
            reason="amount_mismatch",
            paid_fen=evidence.amount_fen,
            price_fen=order.amount_fen,
        )
        # The money passes through suspense, not revenue: it all goes back.
        post_payment(session, order, now, suspense=True)
        request_refund(
            ctx, session, order, evidence.amount_fen, "amount_mismatch", f"{order.id}-mismatch"
        )
        return NotifyOutcome.FLAGGED_AMOUNT
    if late and not _honour_late(ctx, session, order):
        post_payment(session, order, now, suspense=True)
        request_refund(ctx, session, order, order.amount_fen, "late_payment", f"{order.id}-late")
        return NotifyOutcome.PAID_LATE_REFUNDING
    post_payment(session, order, now, suspense=False)
    queue_start(ctx, session, order)
    return NotifyOutcome.PAID


def device_key_id(device: Device) -> str:
    """The id of the command key the device holds (rotated by provisioning)."""
    return device.key_id or "k1"


def _honour_late(ctx: ServiceContext, session: Session, order: Order) -> bool:
    """Run a late-paid order only if the policy allows and the appliance is free now."""
    if ctx.settings.late_payment_policy != "honour_if_free":
        return False
    device = session.get_one(Device, order.device_id, with_for_update=True)
    return device.online and device.state == "idle" and device.current_order_id is None


def next_command_seq(session: Session, device: Device) -> int:
    """The device's next command sequence number; the caller holds the device's row lock.

    Commands are never deleted, so their count rises with every command issued.
    """
    issued = session.scalar(
        select(func.count()).select_from(Command).where(Command.device_id == device.id)
    )
    return int(issued or 0) + 1


def queue_start(ctx: ServiceContext, session: Session, order: Order) -> Command:
    """Write the signed start command for a paid order into the outbox.

    It is signed once, here: every re-send carries the same id, sequence number and
    signature, so the device recognises it as the same command.
    """
    now = ctx.clock.now()
    deadline = now + timedelta(seconds=ctx.settings.start_deadline_s)
    device = session.get_one(Device, order.device_id, with_for_update=True)
    key_id = device_key_id(device)
    body = StartCommandBody(
        v=1,
        cmd_id=ctx.ids.token(12),
        order_id=order.id,
        program=order.program_code,
        duration_s=order.duration_s,
        issued_at=now,
        expires_at=deadline,
        seq=next_command_seq(session, device),
        key_id=key_id,
    )
    row = add_signed_command(ctx, session, device, order.id, "start", body)
    record_event(session, order.id, now, "command_queued", cmd_id=row.id)
    return row


def add_signed_command(
    ctx: ServiceContext,
    session: Session,
    device: Device,
    order_id: str,
    kind: str,
    body: StartCommandBody | StopCommandBody,
) -> Command:
    """Sign `body` with the device's key and add it to the outbox, due at once."""
    key = device_key(ctx.settings.secret_key.encode(), device.code, body.key_id)
    command = sign_command(body, key, device.code)
    row = Command(
        id=command.cmd_id,
        order_id=order_id,
        device_id=device.id,
        kind=kind,
        status="pending",
        payload=command.model_dump(mode="json"),
        attempts=0,
        created_at=body.issued_at,
        next_attempt_at=body.issued_at,
        deadline_at=body.expires_at,
    )
    session.add(row)
    return row

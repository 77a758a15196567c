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
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.domain import ledger as rules
from roompay.domain.catalog import Wallet
from roompay.domain.orders import OrderStatus, can_move
from roompay.logs import order_context
from roompay.payments.base import PaymentNotification, TradeSnapshot, TradeState
from roompay.protocol.messages import StartCommand, StartCommandBody, StopCommand, StopCommandBody
from roompay.protocol.signing import DEFAULT_KEY_ID, device_key, sign_command
from roompay.services.context import ServiceContext
from roompay.services.ledger import entry_rows, insert_entry, post_payment
from roompay.services.refunds import request_refund
from roompay.services.timeline import record_event
from roompay.services.webhooks import Step, insert_steps, queue_deliveries
from roompay.store import driver, hot_path
from roompay.store.models import Command, Device, Order, PaymentNotice
from roompay.store.writer import AfterCommit, Job

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
    return ctx.execute(notification_job(ctx, notice), writer_key(ctx, notice.out_trade_no))


def writer_key(ctx: ServiceContext, order_id: str) -> str:
    """The writer key of evidence about an order: its appliance's code (the order id if
    there is no such order; its job then locks no appliance)."""
    known = ctx.order_devices.get(order_id)
    if known is not None:
        return known
    with ctx.sessions() as session:
        code = (
            session.connection()
            .execute(hot_path.ORDER_DEVICE_CODE, {"p_order_id": order_id})
            .scalar()
        )
    return order_id if code is None else str(code)


def notification_job(ctx: ServiceContext, notice: PaymentNotification) -> Job[NotifyResult]:
    """The writer's job for a verified payment notification."""
    evidence_job = _evidence_job(ctx, PaymentEvidence.from_notification(notice))

    def job(session: Session, after: AfterCommit) -> NotifyResult:
        if not notice.merchant_ok:
            after.add(lambda: log.warning("notification for another merchant or app refused"))
            return NotifyResult(NotifyOutcome.REJECTED_MERCHANT)
        return NotifyResult(evidence_job(session, after))

    return job


def apply_evidence(ctx: ServiceContext, evidence: PaymentEvidence) -> NotifyOutcome:
    """Apply payment evidence (a notify's or a query's) exactly once."""
    return ctx.execute(_evidence_job(ctx, evidence), writer_key(ctx, evidence.out_trade_no))


def _evidence_job(ctx: ServiceContext, evidence: PaymentEvidence) -> Job[NotifyOutcome]:
    def job(session: Session, after: AfterCommit) -> NotifyOutcome:
        with order_context(evidence.out_trade_no):
            outcome = pay_and_start(ctx, session, evidence, after)
            if outcome is None:
                outcome = _apply(ctx, session, evidence)
                if outcome is NotifyOutcome.PAID:
                    after.add(ctx.on_commands_queued)
        after.add(lambda: _report(ctx, evidence.out_trade_no, outcome))
        after.add(ctx.steps_written)
        return outcome

    return job


def _report(ctx: ServiceContext, order_id: str, outcome: NotifyOutcome) -> None:
    """Log a committed outcome and wake the refund worker if money is owed back."""
    with order_context(order_id):
        if outcome in REFUSED:
            log.warning("payment evidence refused: %s", outcome)
        else:
            log.info("payment evidence handled: %s", outcome)
    if outcome in (NotifyOutcome.PAID_LATE_REFUNDING, NotifyOutcome.FLAGGED_AMOUNT):
        ctx.on_refunds_queued()


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
    session.add(PaymentNotice(**_notice_row(evidence, order_id, outcome, ctx.clock.now())))


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


def next_command_seq(session: Session, device_id: int) -> int:
    """Take the device's next command sequence number; the row stays locked until commit.

    One UPDATE both locks the device and counts on from its last number, so two
    transactions issuing commands to one device never take the same number.
    """
    numbered = session.connection().execute(hot_path.NEXT_COMMAND_SEQ, {"p_device_id": device_id})
    return int(numbered.one().command_seq)


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
        seq=next_command_seq(session, device.id),
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
    _, values = signed_outbox_row(ctx, device.code, device.id, order_id, kind, body)
    row = Command(**values)
    session.add(row)
    return row


def signed_outbox_row(
    ctx: ServiceContext,
    code: str,
    device_id: int,
    order_id: str,
    kind: str,
    body: StartCommandBody | StopCommandBody,
    *,
    sent: bool = False,
) -> tuple[StartCommand | StopCommand, dict[str, Any]]:
    """Sign `body` with the device's key; the signed command and its outbox row.

    Due at once; or, with `sent`, counted as sent now (it is published at commit) and
    due again after `command_resend_s`.
    """
    key = device_key(ctx.settings.secret_key.encode(), code, body.key_id)
    command = sign_command(body, key, code)
    now = body.issued_at
    resend = timedelta(seconds=ctx.settings.command_resend_s)
    return command, {
        "id": command.cmd_id,
        "order_id": order_id,
        "device_id": device_id,
        "kind": kind,
        "status": "sent" if sent else "pending",
        "payload": command.model_dump(mode="json"),
        "attempts": 1 if sent else 0,
        "created_at": now,
        "next_attempt_at": now + resend if sent else now,
        "deadline_at": body.expires_at,
        "sent_at": now if sent else None,
    }


# --- the common case in a few statements ------------------------------------------------
#
# A first payment, of the right amount, for an order still awaiting it: by far the most
# frequent evidence, and the one a guest waits on. It is applied with the prepared Core
# statements of `store.hot_path` (no ORM unit of work): a conditional UPDATE locks the
# order and moves it to paid; then the terms in force, the device's next sequence
# number, the ledger entry, the signed command, the steps and the notice. Anything else
# returns None before writing and takes the ORM path above, which knows every other case.


def pay_and_start(
    ctx: ServiceContext, session: Session, evidence: PaymentEvidence, after: AfterCommit
) -> NotifyOutcome | None:
    """Apply the common case (see above); None if this evidence is not it."""
    if evidence.state is not TradeState.SUCCESS:
        return None
    now = ctx.clock.now()
    paid_at = evidence.paid_at or now
    conn = session.connection()
    order_id, wallet = evidence.out_trade_no, evidence.wallet.value
    pay = {
        "p_order_id": order_id,
        "p_wallet": wallet,
        "p_amount_fen": evidence.amount_fen,
        "p_paid_at": paid_at,
        "p_provider_trade_no": evidence.provider_trade_no,
    }
    day = rules.beijing_day(paid_at)
    fused = hot_path.fused(conn)
    order: Any
    terms: Any
    numbered: Any
    if fused:
        # One round trip: paid, numbered and the terms (the row holds all three).
        order = terms = numbered = driver.first(
            conn, hot_path.PAY_NUMBER_AND_TERMS, pay | {"p_day": day}
        )
        if order is None:
            return None
    else:
        order = conn.execute(hot_path.PAY_ORDER, pay).first()
        if order is None:
            return None
        terms = conn.execute(
            hot_path.PAYMENT_TERMS, {"p_hotel_id": order.hotel_id, "p_wallet": wallet, "p_day": day}
        ).one()
        numbered = conn.execute(hot_path.NEXT_COMMAND_SEQ, {"p_device_id": order.device_id}).one()
    posting = rules.payment_posting(
        order_id, wallet, order.hotel_id, evidence.amount_fen, _fees(terms), _contract(terms)
    )
    publisher = ctx.publisher_ready()
    command = _start_command(ctx, order_id, order, numbered, now, sent=publisher is not None)
    source = "query" if evidence.source_id.startswith("query:") else "notify"
    steps: list[tuple[str, dict[str, Any]]] = [
        (
            "paid",
            {"provider_trade_no": evidence.provider_trade_no, "late": False, "source": source},
        ),
        ("command_queued", {"cmd_id": command.cmd_id}),
    ]
    if publisher is not None:
        steps.append(("command_sent", {"cmd_id": command.cmd_id}))
    notice = _notice_row(evidence, order_id, NotifyOutcome.PAID, now)
    webhooks = terms.webhook_endpoint is not None
    booking = {
        "now": now,
        "occurred_at": paid_at,
        "hotel_id": order.hotel_id,
        "order_id": order_id,
        "wallet": wallet,
    }
    if fused:
        entry, lines = entry_rows(posting, **booking)
        recorded = driver.rows(
            conn,
            hot_path.payment_writes(len(lines), len(steps)),
            hot_path.payment_write_params(
                entry, lines, command.row, steps, notice, order_id=order_id, at=now
            ),
        )
        if webhooks:
            queue_deliveries(session, [Step(r.id, order_id, r.event) for r in recorded], now)
    else:
        insert_entry(conn, posting, **booking)
        conn.execute(hot_path.INSERT_COMMAND, command.row)
        insert_steps(session, order_id, now, steps, webhooks=webhooks)
        conn.execute(hot_path.INSERT_NOTICE, notice)
    if publisher is not None:
        code = command.device
        after.add(lambda: publisher.publish_start(code, command.signed))
    else:
        after.add(ctx.on_commands_queued)
    return NotifyOutcome.PAID


@dataclass(frozen=True, slots=True)
class _Written:
    """A signed start command, its outbox row, and where it goes."""

    cmd_id: str
    device: str
    signed: StartCommand
    row: dict[str, Any]


def _start_command(
    ctx: ServiceContext,
    order_id: str,
    order: Any,
    numbered: Any,
    now: datetime,
    *,
    sent: bool,
) -> _Written:
    """Sign the order's start command and make its outbox row: `sent` if it goes out at
    commit.

    `order` has the device, program and duration `PAY_ORDER` returns; `numbered` the
    command number, code and key id `NEXT_COMMAND_SEQ` returns.
    """
    deadline = now + timedelta(seconds=ctx.settings.start_deadline_s)
    code = numbered.code
    body = StartCommandBody(
        v=1,
        cmd_id=ctx.ids.token(12),
        order_id=order_id,
        program=order.program_code,
        duration_s=order.duration_s,
        issued_at=now,
        expires_at=deadline,
        seq=numbered.command_seq,
        key_id=numbered.key_id or DEFAULT_KEY_ID,
    )
    command, row = signed_outbox_row(ctx, code, order.device_id, order_id, "start", body, sent=sent)
    assert isinstance(command, StartCommand)  # a start body signs into a start command
    return _Written(command.cmd_id, code, command, row)


def _contract(terms: Any) -> rules.HotelContract:
    if terms.c_effective_from is None:
        raise rules.LedgerError("no hotel contract in force")
    return rules.HotelContract(
        terms.c_effective_from,
        terms.c_share_bp,
        rules.ShareBasis(terms.c_basis),
        terms.c_min_monthly_guarantee_fen,
    )


def _fees(terms: Any) -> rules.FeeSchedule:
    if terms.f_effective_from is None:
        raise rules.LedgerError("no provider fee schedule in force")
    return rules.FeeSchedule(
        terms.f_effective_from, terms.f_rate_bp, rules.RefundFeeRule(terms.f_refund_rule)
    )


def _notice_row(
    evidence: PaymentEvidence, order_id: str | None, outcome: NotifyOutcome, now: datetime
) -> dict[str, Any]:
    return {
        "wallet": evidence.wallet.value,
        "notification_id": evidence.source_id[:128],
        "out_trade_no": evidence.out_trade_no,
        "provider_trade_no": evidence.provider_trade_no,
        "amount_fen": evidence.amount_fen,
        "trade_state": evidence.state.value,
        "order_id": order_id,
        "outcome": outcome.value,
        "received_at": now,
    }

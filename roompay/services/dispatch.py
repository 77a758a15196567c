"""The outbox dispatcher: publishes queued start commands until the device answers.

The same command id is re-sent every `command_resend_s` until the device answers
or the start deadline passes; a deadline passed without an answer fails the start
and owes the guest a full refund. Rows are claimed with FOR UPDATE SKIP LOCKED on
PostgreSQL, so several server processes can dispatch side by side.
"""

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.logs import order_context
from roompay.protocol.messages import StartCommand, StopCommand
from roompay.services.context import CommandPublisher, ServiceContext
from roompay.services.refunds import paid_total, request_refund
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Command, Device, Order

log = logging.getLogger(__name__)

OPEN_STATUSES = ("pending", "sent")


def dispatch_due(ctx: ServiceContext, publisher: CommandPublisher, batch: int = 200) -> int:
    """Send or expire every command that is due; return how many were handled."""
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        rows = session.execute(
            select(Command, Device.code)
            .join(Device, Command.device_id == Device.id)
            .where(Command.status.in_(OPEN_STATUSES), Command.next_attempt_at <= now)
            .order_by(Command.next_attempt_at)
            .limit(batch)
            .with_for_update(skip_locked=True, of=Command)
        ).all()
        for command, code in rows:
            with order_context(command.order_id):
                _handle(ctx, session, publisher, command, code)
    return len(rows)


def _handle(
    ctx: ServiceContext, session: Session, publisher: CommandPublisher, command: Command, code: str
) -> None:
    now = ctx.clock.now()
    if now >= command.deadline_at:
        command.status = "expired"
        if command.kind == "stop":  # the run goes on; its own end settles the order
            record_event(session, command.order_id, now, "stop_failed", cmd_id=command.id)
            return
        fail_start(ctx, session, command.order_id, "start_deadline_passed")
        return
    command.next_attempt_at = now + timedelta(seconds=ctx.settings.command_resend_s)
    if not publisher.connected:
        return
    if command.kind == "stop":
        publisher.publish_stop(code, StopCommand.model_validate(command.payload))
    else:
        publisher.publish_start(code, StartCommand.model_validate(command.payload))
    command.status = "sent"
    command.attempts += 1
    command.sent_at = command.sent_at or now
    if command.attempts == 1:
        record_event(session, command.order_id, now, "command_sent", cmd_id=command.id)


def fail_start(ctx: ServiceContext, session: Session, order_id: str, reason: str) -> None:
    """The appliance did not start: owe the guest everything back."""
    order = session.get_one(Order, order_id, with_for_update=True)
    record_event(session, order_id, ctx.clock.now(), "start_failed", reason=reason)
    request_refund(ctx, session, order, paid_total(order), reason, key=f"{order_id}-start")
    ctx.on_refunds_queued()
    log.warning("start failed: %s", reason)

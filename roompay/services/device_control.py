"""What staff tell appliances to do: stop a run, checked against who they are.

A stop goes through the same outbox as a start (`commands`, kind `stop`): signed once
with the device's key and the next sequence number, re-sent with the same id by the
dispatcher until the device answers or `start_deadline_s` passes. The device ends the
run as `remote_stop`; its `ended` event then settles the order and the pro-rated refund
(`domain/refunds.py`), exactly as for any other early end.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.domain.orders import OrderStatus
from roompay.logs import order_context
from roompay.protocol.messages import StopCommandBody
from roompay.services.auth import Principal, Role
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError, conflict, not_found
from roompay.services.payments import add_signed_command, device_key_id, next_command_seq
from roompay.services.staff import audit
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Command, Device, Order, RunEventRecord

STOP_ROLES = frozenset({Role.ADMIN, Role.MANAGER, Role.FRONT_DESK, Role.TECHNICIAN})
# The command's own `reason` field: machine words, only logged by the device. The staff
# member's free text goes to the audit log and the order's timeline.
STOP_COMMAND_REASON = "staff_stop"


@dataclass(frozen=True, slots=True)
class StopView:
    """A stop command as staff see it."""

    command_id: str
    device: str
    order_id: str
    run_id: str
    status: str
    created_at: datetime


def _view(command: Command, device: Device) -> StopView:
    return StopView(
        command.id,
        device.code,
        command.order_id,
        str(command.payload["run_id"]),
        command.status,
        command.created_at,
    )


def stop_run(ctx: ServiceContext, principal: Principal, device_code: str, reason: str) -> StopView:
    """Queue a signed stop for the run on this device, with a reason, in the audit log.

    Staff of the device's hotel (and the operator) may; others are told the device does
    not exist. A device with no running order is `device_not_running` and nothing is
    written. Asking again while a stop is still on its way returns that stop.
    """
    if principal.role not in STOP_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot stop appliances")
    with transaction(ctx.sessions) as session:
        device = session.scalars(
            select(Device).where(Device.code == device_code).with_for_update()
        ).one_or_none()
        scope = principal.hotel_scope()
        if device is None or (scope is not None and device.hotel_id != scope):
            raise not_found("unknown_device", "no such device")
        order = _running_order(session, device)
        with order_context(order.id):
            pending = _open_stop(session, order)
            if pending is not None:
                return _view(pending, device)  # the same request again: the same stop
            run_id = _run_id(session, order)
            command = _queue_stop(ctx, session, device, order, run_id)
            now = ctx.clock.now()
            audit(
                session,
                principal,
                now,
                "stop",
                device.code,
                device.hotel_id,
                order_id=order.id,
                run_id=run_id,
                cmd_id=command.id,
                reason=reason,
            )
            record_event(
                session,
                order.id,
                now,
                "stop_requested",
                cmd_id=command.id,
                by=principal.username,
                reason=reason,
            )
            view = _view(command, device)
    ctx.on_commands_queued()
    return view


def _running_order(session: Session, device: Device) -> Order:
    order = (
        None
        if device.current_order_id is None
        else session.get(Order, device.current_order_id, with_for_update=True)
    )
    if order is None or order.status != OrderStatus.RUNNING:
        raise conflict(
            "device_not_running", "the appliance is not running; there is nothing to stop"
        )
    return order


def _open_stop(session: Session, order: Order) -> Command | None:
    return session.scalars(
        select(Command)
        .where(
            Command.order_id == order.id,
            Command.kind == "stop",
            Command.status.in_(("pending", "sent")),
        )
        .limit(1)
    ).first()


def _run_id(session: Session, order: Order) -> str:
    """The device's id for the order's run, from the run events it reported."""
    run_id = session.scalars(
        select(RunEventRecord.run_id)
        .where(RunEventRecord.order_id == order.id)
        .order_by(RunEventRecord.id.desc())
        .limit(1)
    ).first()
    if run_id is None:  # running is only ever set by a stored run event
        raise conflict("device_not_running", "the appliance has not reported its run")
    return run_id


def _queue_stop(
    ctx: ServiceContext, session: Session, device: Device, order: Order, run_id: str
) -> Command:
    """Write the signed stop command into the outbox; signed once, re-sent unchanged."""
    now = ctx.clock.now()
    deadline = now + timedelta(seconds=ctx.settings.start_deadline_s)
    key_id = device_key_id(device)
    body = StopCommandBody(
        cmd_id=ctx.ids.token(12),
        run_id=run_id,
        order_id=order.id,
        reason=STOP_COMMAND_REASON,
        issued_at=now,
        expires_at=deadline,
        seq=next_command_seq(session, device.id),
        key_id=key_id,
    )
    row = add_signed_command(ctx, session, device, order.id, "stop", body)
    session.flush()
    return row

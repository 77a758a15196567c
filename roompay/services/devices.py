"""What devices tell the server: presence, command answers, run events and faults.

Each message is applied in one transaction and is idempotent: a run event is kept
once per (run, event, seq), presence never goes back to an older boot, an order
only moves forward, and a fault report older than the last one changes nothing.

A faulted device has state `fault` until it reports the fault cleared; each change
is kept in the audit log (`device_fault` / `device_fault_cleared`, no user) with the
fault code and the device's time, which is where staff find what went wrong and when.
"""

import logging
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roompay.domain.orders import OrderStatus, can_move
from roompay.domain.refunds import RefundPolicy
from roompay.logs import order_context
from roompay.protocol.errors import ProtocolError
from roompay.protocol.messages import (
    AckStatus,
    BootEvent,
    CommandAck,
    DevicePresence,
    EndReason,
    FaultEvent,
    Heartbeat,
    Message,
    RejectReason,
    RunEvent,
    RunEventKind,
    StateMessage,
    decode,
)
from roompay.protocol.topics import EventName, ParsedTopic, TopicKind
from roompay.services.context import ServiceContext
from roompay.services.dispatch import fail_start
from roompay.services.refunds import cancel_unsent_refund, request_refund, settle_order_status
from roompay.services.timeline import record_event
from roompay.services.webhooks import Step, insert_steps, queue_deliveries
from roompay.store import driver, hot_path
from roompay.store.db import transaction
from roompay.store.models import (
    AuditEntry,
    Command,
    Device,
    Order,
    RunEventRecord,
)
from roompay.store.writer import AfterCommit, Job

log = logging.getLogger(__name__)

FAULT_RAISED = "device_fault"
FAULT_CLEARED = "device_fault_cleared"
# The fault code kept when a device shows a fault without naming it: a run it ended
# as `fault`, or a start it refused as `fault`.
UNNAMED_FAULT = "unreported"


def handle_device_message(ctx: ServiceContext, topic: ParsedTopic, payload: bytes) -> None:
    """Apply one message from a device; malformed or foreign messages change nothing."""
    job = device_message_job(ctx, topic, payload)
    if job is not None:
        ctx.execute(job, topic.code)


def submit_device_message(ctx: ServiceContext, topic: ParsedTopic, payload: bytes) -> None:
    """Queue one message from a device for its appliance's writer and return at once.

    A heartbeat is only noted (`HeartbeatBuffer`): `flush_heartbeats` writes them.

    The device link calls it on its network thread: decoding and handing over return at
    once (a handler thread that waited for each commit kept one message of its
    appliances in flight, so the writers committed small batches, and every message
    cost thread wake-ups). The writer applies an appliance's messages in the order
    given, answers to commands first (`urgent`); a failure is logged here.
    """
    if (topic.kind, topic.name) == (TopicKind.EVT, EventName.HB):
        _note_heartbeat(ctx, topic.code, payload)
        return
    job = device_message_job(ctx, topic, payload)
    if job is None:
        return
    ctx.submit(job, topic.code, urgent=topic.is_answer).add_done_callback(
        lambda done: _log_failure(done, topic)
    )


def _note_heartbeat(ctx: ServiceContext, code: str, payload: bytes) -> None:
    try:
        decode(Heartbeat, payload)
    except ProtocolError as exc:
        log.warning("bad message from device %s: %s", code, exc)
        return
    ctx.heartbeats.note(code, ctx.clock.now())


def flush_heartbeats(ctx: ServiceContext) -> int:
    """Write the heartbeats noted since the last flush; return how many appliances.

    One job per writer, each with the appliances that writer owns (so no two writers
    lock one appliance's row). A heartbeat heard before a birth or a will that is
    already written changes nothing (`hot_path.HEARTBEAT`).
    """
    heard = ctx.heartbeats.take()
    pending = [
        ctx.submit(_heartbeats_job({code: heard[code] for code in codes}), codes[0])
        for codes in ctx.by_writer(sorted(heard))
    ]
    for future in pending:
        future.result()
    return len(heard)


def _heartbeats_job(heard: dict[str, datetime]) -> Job[None]:
    """Write heartbeats heard (appliance -> when), one statement run for each."""

    def job(session: Session, after: AfterCommit) -> None:
        conn = session.connection()
        params = [{"p_code": code, "p_now": at} for code, at in heard.items()]
        if conn.execute(hot_path.HEARTBEAT, params).rowcount < len(heard):
            # Not written: unknown, or a birth or will heard since (that is no error).
            found = conn.execute(hot_path.KNOWN_DEVICE_CODES, {"p_codes": list(heard)})
            unknown = sorted(set(heard) - set(found.scalars()))
            if unknown:
                after.add(lambda: log.warning("messages from unknown devices %s", unknown))

    return job


def _log_failure(done: "Future[None]", topic: ParsedTopic) -> None:
    failure = done.exception()
    if failure is not None:
        log.error(
            "device message %s/%s from %s failed",
            topic.kind,
            topic.name,
            topic.code,
            exc_info=failure,
        )


def device_message_job(ctx: ServiceContext, topic: ParsedTopic, payload: bytes) -> Job[None] | None:
    """The writer's job for one device message; None (logged) if there is nothing to do.

    The payload is parsed here, on the caller's thread, so the writer only writes.
    """
    known = _HANDLERS.get((str(topic.kind), None if topic.name is None else str(topic.name)))
    if known is None:
        log.info("ignored device message on %s/%s", topic.kind, topic.name)
        return None
    model, handler = known
    try:
        message = decode(model, payload)
    except ProtocolError as exc:
        log.warning("bad message from device %s: %s", topic.code, exc)
        return None
    return lambda session, after: handler(ctx, session, after, topic.code, message)


def _device(session: Session, code: str) -> Device | None:
    device = session.scalars(
        select(Device).where(Device.code == code).with_for_update()
    ).one_or_none()
    if device is None:
        log.warning("message from unknown device %s", code)
    return device


def _on_state(
    ctx: ServiceContext, session: Session, after: AfterCommit, code: str, message: StateMessage
) -> None:
    now = ctx.clock.now()
    online = message.state is DevicePresence.ONLINE
    # A stale will from an earlier boot must not overwrite a newer birth.
    device_id = (
        session.connection()
        .execute(
            hot_path.DEVICE_PRESENCE,
            {"p_code": code, "p_boot_id": message.boot_id, "p_online": online, "p_now": now},
        )
        .scalar()
    )
    if device_id is None:
        _unknown_or_stale(session, after, code)
        return
    if online and _resend_open_commands(session, device_id, now) > 0:
        after.add(ctx.on_commands_queued)


def _unknown_or_stale(session: Session, after: AfterCommit, code: str) -> None:
    known = session.connection().execute(hot_path.DEVICE_ID, {"p_code": code}).scalar()
    if known is None:
        after.add(lambda: log.warning("message from unknown device %s", code))


def _resend_open_commands(session: Session, device_id: int, now: datetime) -> int:
    """Make the device's unanswered commands due now: it may have missed them offline."""
    result = session.connection().execute(
        hot_path.RESEND_OPEN_COMMANDS, {"p_device_id": device_id, "p_now": now}
    )
    return int(getattr(result, "rowcount", 0) or 0)


def mark_silent_devices_offline(ctx: ServiceContext) -> int:
    """Devices not heard from for `device_stale_after_s` are offline, will or no will."""
    cutoff = ctx.clock.now() - timedelta(seconds=ctx.settings.device_stale_after_s)
    with transaction(ctx.sessions) as session:
        result = session.execute(
            update(Device)
            .where(Device.online.is_(True), Device.last_seen_at < cutoff)
            .values(online=False)
        )
    return int(getattr(result, "rowcount", 0) or 0)


def _on_boot(
    ctx: ServiceContext, session: Session, after: AfterCommit, code: str, boot: BootEvent
) -> None:
    """A device rebooted: whatever it has not answered yet, it gets again now."""
    now = ctx.clock.now()
    device_id = (
        session.connection()
        .execute(hot_path.DEVICE_BOOTED, {"p_code": code, "p_boot_id": boot.boot_id, "p_now": now})
        .scalar()
    )
    if device_id is None:
        _unknown_or_stale(session, after, code)
        return
    if _resend_open_commands(session, device_id, now) > 0:
        after.add(ctx.on_commands_queued)


def _on_heartbeat(
    ctx: ServiceContext, session: Session, after: AfterCommit, code: str, _beat: Heartbeat
) -> None:
    _heartbeats_job({code: ctx.clock.now()})(session, after)


def _on_ack(
    ctx: ServiceContext, session: Session, after: AfterCommit, code: str, ack: CommandAck
) -> None:
    after.add(ctx.steps_written)
    if _start_accepted(ctx, session, after, code, ack):
        return
    device = _device(session, code)
    command = session.get(Command, ack.cmd_id, with_for_update=True)
    if device is None or command is None or command.device_id != device.id:
        log.warning("ack for a command %s not sent to %s", ack.cmd_id, code)
        return
    with order_context(command.order_id):
        _apply_ack(ctx, session, command, ack)


def _start_accepted(
    ctx: ServiceContext, session: Session, after: AfterCommit, code: str, ack: CommandAck
) -> bool:
    """The common answer, in two statements: the device accepted a start still open.

    False (nothing written) for every other answer; `_apply_ack` knows them all.
    """
    accepted = ack.status is AckStatus.ACCEPTED or (
        ack.status is AckStatus.DUPLICATE and ack.run_id is not None
    )
    if not accepted:
        return False
    now = ctx.clock.now()
    conn = session.connection()
    params = {"p_cmd_id": ack.cmd_id, "p_code": code, "p_now": now, "p_answer": _answer(ack)}
    detail = {"cmd_id": ack.cmd_id, "run_id": ack.run_id}
    if hot_path.fused(conn):
        row = driver.first(
            conn,
            hot_path.ACCEPT_START_RECORDED,
            params | {"p_step_event": "command_accepted", "p_step_detail": detail},
        )
        if row is None:
            return False
    else:
        row = conn.execute(hot_path.ACCEPT_START, params).first()
        if row is None:
            return False
        conn.execute(
            hot_path.INSERT_STEPS,
            {"order_id": row.order_id, "at": now, "event": "command_accepted", "detail": detail},
        )
    # The command was written in the very transaction that took the payment.
    waited = (now - row.created_at).total_seconds()
    after.add(lambda: ctx.metrics.command_seconds.observe(waited))
    return True


def _answer(ack: CommandAck) -> str:
    return (ack.status.value if ack.reason is None else f"{ack.status}:{ack.reason}")[:64]


def _apply_ack(ctx: ServiceContext, session: Session, command: Command, ack: CommandAck) -> None:
    if command.status not in ("pending", "sent"):
        return  # already answered; a duplicate answer changes nothing
    now = ctx.clock.now()
    command.answered_at = now
    command.answer = _answer(ack)
    # A `duplicate` repeats the device's first answer: a rejection if it names a reason
    # and no run, an acceptance if it names the run.
    rejected = ack.status is AckStatus.REJECTED or (
        ack.status is AckStatus.DUPLICATE and ack.run_id is None
    )
    if command.kind == "stop":
        # A stop that is refused (the run already ended) owes nothing: the run's own
        # `ended` event settles the order either way.
        command.status = "rejected" if rejected else "accepted"
        event = "stop_rejected" if rejected else "stop_accepted"
        record_event(session, command.order_id, now, event, cmd_id=command.id, reason=ack.reason)
        return
    if rejected:
        command.status = "rejected"
        fail_start(ctx, session, command.order_id, f"device_rejected:{ack.reason}")
        if ack.reason == RejectReason.FAULT:
            device = session.get_one(Device, command.device_id)
            _apply_fault(session, device, UNNAMED_FAULT, True, ack.ts, now, "start_rejected")
        return
    command.status = "accepted"
    order = session.get_one(Order, command.order_id)
    record_event(session, order.id, now, "command_accepted", cmd_id=command.id, run_id=ack.run_id)
    if order.paid_at is not None:
        ctx.metrics.command_seconds.observe((now - order.paid_at).total_seconds())


def _on_run(
    ctx: ServiceContext, session: Session, after: AfterCommit, code: str, event: RunEvent
) -> None:
    with order_context(event.order_id):
        stored = _run_event_fast(ctx, session, code, event)
        if stored is None:
            stored = _apply_run_event(ctx, session, code, event)
    if stored:
        # Stored (now or before): the device may drop it from its outbox.
        after.add(lambda: ctx.on_run_event_stored(code, event.run_id, event.seq))
        after.add(ctx.steps_written)


def _apply_run_event(ctx: ServiceContext, session: Session, code: str, event: RunEvent) -> bool:
    """Apply a run event once; tell whether it is stored (False: not this device's)."""
    device = _device(session, code)
    order = session.get(Order, event.order_id, with_for_update=True)
    if device is None or order is None or order.device_id != device.id:
        log.warning("run event for an order %s not placed on %s", event.order_id, code)
        return False
    if not _first_time(ctx, session, device, order, event):
        return True
    if event.event is RunEventKind.STARTED:
        _started(ctx, session, device, order, event)
    elif event.event is RunEventKind.ENDED:
        _ended(ctx, session, device, order, event)
        if event.reason is EndReason.FAULT and device.state != "fault":
            # The device ends a run as `fault` only when it has marked itself faulted.
            _apply_fault(
                session, device, UNNAMED_FAULT, True, event.ts, ctx.clock.now(), "run_ended"
            )
    return True


def _run_event_fast(
    ctx: ServiceContext, session: Session, code: str, event: RunEvent
) -> bool | None:
    """`started`, and `ended` as completed, in five Core statements; None: not handled.

    The common runs of an order without refunds. None (nothing written) for another
    kind of event, someone else's order, or an order not in the state the event moves it
    from: `_apply_run_event` knows those. A repeat is stored already: True.
    """
    if event.event is RunEventKind.STARTED:
        moves_from = OrderStatus.PAID
    elif event.event is RunEventKind.ENDED and event.reason is EndReason.COMPLETED:
        moves_from = OrderStatus.RUNNING
    else:
        return None
    conn = session.connection()
    order = driver.first(conn, hot_path.RUN_ORDER, {"p_order_id": event.order_id, "p_code": code})
    if order is None or order.status != moves_from.value or order.refunds:
        return None
    now = ctx.clock.now()
    keep = {
        "p_order_id": event.order_id,
        "p_device_id": order.device_id,
        "p_run_id": event.run_id,
        "p_event": event.event.value,
        "p_seq": event.seq,
        "p_elapsed_s": event.elapsed_s,
        "p_remaining_s": event.remaining_s,
        "p_reported_at": event.ts,
        "p_received_at": now,
    }
    webhooks = order.webhook_endpoint is not None
    if hot_path.fused(conn):
        _run_event_in_one(session, event, keep, moves_from, webhooks=webhooks)
        return True
    kept = conn.execute(hot_path.KEEP_RUN_EVENT[conn.dialect.name], keep).scalar()
    if kept is None:
        return True  # seen before: stored, nothing more to do
    if moves_from is OrderStatus.PAID:
        step = _start_run(conn, order.device_id, event)
    else:
        step = _complete_run(conn, order.device_id, event)
    insert_steps(session, event.order_id, now, [step], webhooks=webhooks)
    return True


def _run_event_in_one(
    session: Session,
    event: RunEvent,
    keep: dict[str, Any],
    moves_from: OrderStatus,
    *,
    webhooks: bool,
) -> None:
    """`_run_event_fast`'s writes as one statement (PostgreSQL): nothing if a repeat."""
    if moves_from is OrderStatus.PAID:
        statement = hot_path.RUN_STARTED
        params: dict[str, Any] = {"p_at": event.ts}
        step, detail = "started", {"run_id": event.run_id}
    else:
        statement = hot_path.RUN_COMPLETED
        step, detail = "ended", _completion(event)
        params = {
            "p_at": event.ts,
            "p_actual_run_s": detail["actual_run_s"],
            "p_end_reason": detail["reason"],
        }
    row = driver.first(
        session.connection(),
        statement,
        keep | params | {"p_step_event": step, "p_step_detail": detail},
    )
    if row is not None and webhooks:
        queue_deliveries(session, [Step(row.step_id, event.order_id, step)], keep["p_received_at"])


def _completion(event: RunEvent) -> dict[str, Any]:
    """The step detail of a run completed as paid for."""
    actual = event.actual_run_s if event.actual_run_s is not None else event.elapsed_s
    return {"reason": EndReason.COMPLETED.value, "actual_run_s": actual}


def _start_run(conn: Connection, device_id: int, event: RunEvent) -> tuple[str, dict[str, Any]]:
    """The order runs, and the appliance with it."""
    conn.execute(hot_path.START_RUN_ORDER, {"p_order_id": event.order_id, "p_at": event.ts})
    conn.execute(
        hot_path.START_RUN_DEVICE, {"p_device_id": device_id, "p_order_id": event.order_id}
    )
    return "started", {"run_id": event.run_id}


def _complete_run(conn: Connection, device_id: int, event: RunEvent) -> tuple[str, dict[str, Any]]:
    """The run ended as paid for: the order is completed, the appliance free again."""
    detail = _completion(event)
    conn.execute(
        hot_path.COMPLETE_RUN_ORDER,
        {
            "p_order_id": event.order_id,
            "p_at": event.ts,
            "p_actual_run_s": detail["actual_run_s"],
            "p_end_reason": detail["reason"],
        },
    )
    conn.execute(hot_path.FREE_DEVICE, {"p_device_id": device_id, "p_order_id": event.order_id})
    return "ended", detail


def _first_time(
    ctx: ServiceContext, session: Session, device: Device, order: Order, event: RunEvent
) -> bool:
    """Keep the event once; return False if this (run, event, seq) was seen before."""
    record = RunEventRecord(
        order_id=order.id,
        device_id=device.id,
        run_id=event.run_id,
        event=event.event.value,
        seq=event.seq,
        elapsed_s=event.elapsed_s,
        remaining_s=event.remaining_s,
        reported_at=event.ts,
        received_at=ctx.clock.now(),
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError:
        return False
    return True


def _started(
    ctx: ServiceContext, session: Session, device: Device, order: Order, event: RunEvent
) -> None:
    if not can_move(OrderStatus(order.status), OrderStatus.RUNNING):
        log.warning("started event for an order in %s", order.status)
        return
    now = ctx.clock.now()
    order.status = OrderStatus.RUNNING.value
    order.started_at = event.ts
    if device.state != "fault":  # a fault reported meanwhile stands until cleared
        device.state = "running"
    device.current_order_id = order.id
    record_event(session, order.id, now, "started", run_id=event.run_id)
    # A start reported after the server gave up on it (a device clock behind ours):
    # the guest got the run, so the full refund is no longer owed, if not yet sent.
    if cancel_unsent_refund(ctx, session, f"{order.id}-start"):
        log.warning("appliance started after its start deadline; start refund cancelled")


def _ended(
    ctx: ServiceContext, session: Session, device: Device, order: Order, event: RunEvent
) -> None:
    now = ctx.clock.now()
    if order.status == OrderStatus.PAID:
        # The started event was lost; the run still happened.
        order.started_at = order.started_at or event.ts
        order.status = OrderStatus.RUNNING.value
    if order.status != OrderStatus.RUNNING:
        log.warning("ended event for an order in %s", order.status)
        return
    actual = event.actual_run_s if event.actual_run_s is not None else event.elapsed_s
    order.status = OrderStatus.COMPLETED.value
    order.ended_at = event.ts
    order.actual_run_s = actual
    order.end_reason = (event.reason or EndReason.COMPLETED).value
    if device.current_order_id == order.id:
        if device.state != "fault":
            device.state = "idle"
        device.current_order_id = None
    record_event(session, order.id, now, "ended", reason=order.end_reason, actual_run_s=actual)
    if event.reason is not EndReason.COMPLETED:
        policy = RefundPolicy(full_refund_below_s=ctx.settings.full_refund_below_s)
        unused = policy.unused_share(order.amount_fen, order.duration_s, actual)
        if unused > 0:
            reason = f"early_stop:{order.end_reason}"
            request_refund(ctx, session, order, unused, reason, f"{order.id}-early")
            ctx.on_refunds_queued()
    settle_order_status(session, order.id)


def _on_fault(
    ctx: ServiceContext, session: Session, _after: AfterCommit, code: str, report: FaultEvent
) -> None:
    now = ctx.clock.now()
    device = _device(session, code)
    if device is not None:
        device.last_seen_at = now
        _apply_fault(session, device, report.fault, report.active, report.ts, now, "device")


def _apply_fault(
    session: Session,
    device: Device,
    fault: str,
    active: bool,
    reported_at: datetime,
    now: datetime,
    source: str,
) -> None:
    """Raise or clear a device's fault, unless a later report is already applied.

    Raising sets the state `fault` (checkout then refuses the device); clearing sets it
    back to `running` or `idle`. A report that changes nothing (a retained fault seen
    again after a reconnect, a clear for a device that is not faulted) writes nothing.
    """
    last = session.scalars(
        select(AuditEntry)
        .where(
            AuditEntry.target == device.code,
            AuditEntry.action.in_((FAULT_RAISED, FAULT_CLEARED)),
        )
        .order_by(AuditEntry.id.desc())
        .limit(1)
    ).first()
    if last is not None and reported_at < datetime.fromisoformat(str(last.detail["reported_at"])):
        log.info("fault report from %s older than the last one; ignored", device.code)
        return
    faulted = device.state == "fault"
    if active:
        known = last is not None and last.action == FAULT_RAISED and last.detail["fault"] == fault
        if faulted and (fault == UNNAMED_FAULT or known):
            return  # the fault already stands
        device.state = "fault"
        log.warning("device %s reports fault %s", device.code, fault)
    else:
        if not faulted:
            return
        device.state = "running" if device.current_order_id is not None else "idle"
        log.info("device %s reports fault %s cleared", device.code, fault)
    session.add(
        AuditEntry(
            at=now,
            user_id=None,
            hotel_id=device.hotel_id,
            action=FAULT_RAISED if active else FAULT_CLEARED,
            target=device.code,
            detail={"fault": fault, "reported_at": reported_at.isoformat(), "source": source},
        )
    )


_Handler = Callable[[ServiceContext, Session, AfterCommit, str, Any], None]
_HANDLERS: dict[tuple[str, str | None], tuple[type[Message], _Handler]] = {
    (TopicKind.STATE, None): (StateMessage, _on_state),
    (TopicKind.EVT, EventName.ACK): (CommandAck, _on_ack),
    (TopicKind.EVT, EventName.RUN): (RunEvent, _on_run),
    (TopicKind.EVT, EventName.BOOT): (BootEvent, _on_boot),
    (TopicKind.EVT, EventName.HB): (Heartbeat, _on_heartbeat),
    (TopicKind.EVT, EventName.FAULT): (FaultEvent, _on_fault),
}
"""What each device topic carries, and the job that applies it."""

"""Comp sessions: staff start a free run of a program, e.g. after a guest's complaint.

A comp is an order of the `comp` wallet for 0 fen: no provider hears of it and the
ledger moves nothing, but it has a timeline (`comped`, then the usual command and run
steps), shows in the live feed and the webhooks, and leaves an audit entry with its
reason. The start command takes the same signed outbox path as a paid order.
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roompay.domain.orders import OrderStatus
from roompay.logs import order_context
from roompay.services.auth import Principal, Role
from roompay.services.catalog import device_programs
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError, conflict, invalid, not_found
from roompay.services.feed import COMP_WALLET
from roompay.services.payments import queue_start
from roompay.services.staff import audit
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Command, Device, Hotel, Order, Room

COMP_ROLES = frozenset({Role.ADMIN, Role.MANAGER, Role.FRONT_DESK})
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class CompView:
    """A comp as the caller sees it."""

    order_id: str
    device: str
    program: str
    duration_s: int
    amount_fen: int
    status: str
    reason: str
    created_at: datetime
    created: bool  # False when the same Idempotency-Key returned an earlier comp


def start_comp(
    ctx: ServiceContext,
    principal: Principal,
    device_code: str,
    program_code: str,
    reason: str,
    idempotency_key: str | None = None,
) -> CompView:
    """Start a free run on an idle, online appliance of the caller's hotel, with a reason."""
    if principal.role not in COMP_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot start free runs")
    reason = reason.strip()
    if not reason or len(reason) > MAX_REASON:
        raise invalid("invalid_reason", f"give a reason of at most {MAX_REASON} characters")
    key = _key(principal, idempotency_key) if idempotency_key else None
    try:
        view = _start(ctx, principal, device_code, program_code, reason, key)
    except IntegrityError:
        # The same key raced in from a second request: return what the first one made.
        with ctx.sessions() as session:
            found = _existing(session, device_code, key)
            if found is None:
                raise
            return _view(found[0], found[1], reason, created=False)
    if view.created:
        ctx.on_commands_queued()
    return view


def _key(principal: Principal, idempotency_key: str) -> str:
    digest = hashlib.sha256(f"{principal.user_id}|{idempotency_key}".encode()).hexdigest()
    return f"comp:{digest[:40]}"


def _existing(session: Session, device_code: str, key: str | None) -> tuple[Order, str] | None:
    if key is None:
        return None
    row = session.execute(
        select(Order, Device.code)
        .join(Device, Order.device_id == Device.id)
        .where(Device.code == device_code, Order.idempotency_key == key)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def _start(
    ctx: ServiceContext,
    principal: Principal,
    device_code: str,
    program_code: str,
    reason: str,
    key: str | None,
) -> CompView:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        device = session.scalars(
            select(Device).where(Device.code == device_code).with_for_update()
        ).one_or_none()
        scope = principal.hotel_scope()
        if device is None or (scope is not None and device.hotel_id != scope):
            raise not_found("unknown_device", f"no device with code {device_code!r}")
        earlier = _existing(session, device_code, key)
        if earlier is not None:
            return _view(earlier[0], device.code, reason, created=False)
        program = next(
            (p for p in device_programs(session, device) if p.code == program_code), None
        )
        if program is None:
            raise not_found(
                "unknown_program", f"program {program_code!r} is not sold on this device"
            )
        _check_idle(session, device)
        order = Order(
            id=ctx.ids.order_id(),
            device_id=device.id,
            hotel_id=device.hotel_id,
            program_id=program.id,
            program_code=program.code,
            wallet=COMP_WALLET,
            amount_fen=0,
            duration_s=program.duration_s,
            status=OrderStatus.PAID.value,
            idempotency_key=key,
            request_fingerprint=hashlib.sha256(
                f"comp|{device.code}|{program.code}".encode()
            ).hexdigest(),
            created_at=now,
            expires_at=now,
        )
        session.add(order)
        session.flush()
        with order_context(order.id):
            record_event(
                session,
                order.id,
                now,
                "comped",
                reason=reason,
                by=principal.username,
                program=program.code,
                duration_s=program.duration_s,
            )
            queue_start(ctx, session, order)
            audit(
                session,
                principal,
                now,
                "comp",
                order.id,
                device.hotel_id,
                device=device.code,
                program=program.code,
                duration_s=program.duration_s,
                reason=reason,
            )
        return _view(order, device.code, reason, created=True)


def _check_idle(session: Session, device: Device) -> None:
    if not device.online:
        raise conflict("device_offline", "the appliance is offline")
    if device.state == "fault":
        raise conflict("device_faulted", "the appliance reports a fault")
    starting = session.scalar(
        select(Command.id)
        .where(Command.device_id == device.id, Command.status.in_(("pending", "sent")))
        .limit(1)
    )
    if device.state == "running" or device.current_order_id is not None or starting is not None:
        raise conflict("device_busy", "the appliance is running or about to start")


def _view(order: Order, device_code: str, reason: str, *, created: bool) -> CompView:
    return CompView(
        order_id=order.id,
        device=device_code,
        program=order.program_code,
        duration_s=order.duration_s,
        amount_fen=order.amount_fen,
        status=order.status,
        reason=reason,
        created_at=order.created_at,
        created=created,
    )


@dataclass(frozen=True, slots=True)
class CompChoice:
    """An appliance a comp can start now, and the programs it runs."""

    device: str
    kind: str
    hotel: str
    room: str | None
    programs: list[tuple[str, str, int]]  # code, name, duration_s


def comp_choices(session: Session, hotel_scope: int | None) -> list[CompChoice]:
    """The caller's idle, online appliances with their active programs, by hotel and room."""
    query = (
        select(Device, Hotel.code, Room.number)
        .join(Hotel, Device.hotel_id == Hotel.id)
        .outerjoin(Room, Device.room_id == Room.id)
        .where(
            Device.online.is_(True),
            Device.state == "idle",
            Device.current_order_id.is_(None),
        )
        .order_by(Hotel.code, Room.number, Device.code)
    )
    if hotel_scope is not None:
        query = query.where(Device.hotel_id == hotel_scope)
    return [
        CompChoice(
            device=device.code,
            kind=device.kind,
            hotel=hotel,
            room=room,
            programs=[(p.code, p.name, p.duration_s) for p in device_programs(session, device)],
        )
        for device, hotel, room in session.execute(query).all()
    ]

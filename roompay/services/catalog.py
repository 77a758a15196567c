"""What a guest can see and buy on a device."""

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.services.auth import Principal, Role
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError, invalid, not_found
from roompay.services.staff import audit
from roompay.store.db import transaction
from roompay.store.models import Device, Hotel, Program, Room


@dataclass(frozen=True, slots=True)
class ProgramView:
    """A program as a guest sees it."""

    code: str
    name: str
    duration_s: int
    amount_fen: int


@dataclass(frozen=True, slots=True)
class DeviceView:
    """A device as staff and the panel see it."""

    code: str
    kind: str
    hotel: str
    hotel_name: str
    room: str | None
    online: bool
    state: str
    current_order_id: str | None


def get_device(session: Session, code: str) -> Device:
    """Load a device by code or raise not_found."""
    device = session.scalars(select(Device).where(Device.code == code)).one_or_none()
    if device is None:
        raise not_found("unknown_device", f"no device with code {code!r}")
    return device


def device_programs(session: Session, device: Device) -> list[Program]:
    """The active programs of the device's kind at its hotel, cheapest first."""
    query = (
        select(Program)
        .where(
            Program.hotel_id == device.hotel_id,
            Program.kind == device.kind,
            Program.active.is_(True),
        )
        .order_by(Program.amount_fen, Program.code)
    )
    return list(session.scalars(query))


def list_programs(session: Session, device_code: str) -> list[ProgramView]:
    """What a guest can buy on this device."""
    device = get_device(session, device_code)
    return [
        ProgramView(p.code, p.name, p.duration_s, p.amount_fen)
        for p in device_programs(session, device)
    ]


def describe_devices(session: Session, hotel_id: int | None) -> list[DeviceView]:
    """Devices with their hotel and room; all hotels when `hotel_id` is None."""
    query = (
        select(Device, Hotel, Room)
        .join(Hotel, Device.hotel_id == Hotel.id)
        .outerjoin(Room, Device.room_id == Room.id)
        .order_by(Hotel.code, Room.number, Device.code)
    )
    if hotel_id is not None:
        query = query.where(Device.hotel_id == hotel_id)
    return [
        DeviceView(
            code=d.code,
            kind=d.kind,
            hotel=h.code,
            hotel_name=h.name,
            room=r.number if r else None,
            online=d.online,
            state=d.state,
            current_order_id=d.current_order_id,
        )
        for d, h, r in session.execute(query)
    ]


def describe_device(session: Session, code: str) -> DeviceView:
    """One device with its hotel and room."""
    device = get_device(session, code)
    hotel = session.get_one(Hotel, device.hotel_id)
    room = session.get(Room, device.room_id) if device.room_id else None
    return DeviceView(
        code=device.code,
        kind=device.kind,
        hotel=hotel.code,
        hotel_name=hotel.name,
        room=room.number if room else None,
        online=device.online,
        state=device.state,
        current_order_id=device.current_order_id,
    )


# --- programs and prices per hotel, for managers and the operator ---------------------------

PRICE_ROLES = frozenset({Role.ADMIN, Role.MANAGER})
# A sane ceiling for one run of an in-room appliance; anything above is a typo.
MAX_PRICE_FEN = 500_00


@dataclass(frozen=True, slots=True)
class HotelProgram:
    """A program of a hotel as its manager edits it."""

    hotel: str
    code: str
    kind: str
    name: str
    duration_s: int
    amount_fen: int
    active: bool


def _hotel_program(hotel: Hotel, program: Program) -> HotelProgram:
    return HotelProgram(
        hotel=hotel.code,
        code=program.code,
        kind=program.kind,
        name=program.name,
        duration_s=program.duration_s,
        amount_fen=program.amount_fen,
        active=program.active,
    )


def _price_hotel(session: Session, principal: Principal, hotel_code: str) -> Hotel:
    if principal.role not in PRICE_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot change programs")
    hotel = session.scalars(select(Hotel).where(Hotel.code == hotel_code)).one_or_none()
    scope = principal.hotel_scope()
    if hotel is None or (scope is not None and hotel.id != scope):
        raise not_found("unknown_hotel", f"no hotel {hotel_code!r}")
    return hotel


def hotel_programs(session: Session, principal: Principal, hotel_code: str) -> list[HotelProgram]:
    """Every program of a hotel, active or not, by appliance kind and price."""
    hotel = _price_hotel(session, principal, hotel_code)
    programs = session.scalars(
        select(Program)
        .where(Program.hotel_id == hotel.id)
        .order_by(Program.kind, Program.amount_fen, Program.code)
    )
    return [_hotel_program(hotel, p) for p in programs]


def programs_by_hotel(session: Session, principal: Principal) -> list[list[HotelProgram]]:
    """The programs of each hotel the caller may edit, hotel by hotel."""
    if principal.role not in PRICE_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot change programs")
    scope = principal.hotel_scope()
    query = select(Hotel.code).order_by(Hotel.code)
    if scope is not None:
        query = query.where(Hotel.id == scope)
    return [hotel_programs(session, principal, code) for code in session.scalars(query)]


def check_price(amount_fen: int) -> int:
    """A program price: whole fen, at least 1, at most MAX_PRICE_FEN."""
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
        raise invalid("invalid_price", "a price is a whole number of fen")
    if not 1 <= amount_fen <= MAX_PRICE_FEN:
        raise invalid("invalid_price", f"a price must be between 1 and {MAX_PRICE_FEN} fen")
    return amount_fen


def update_program(
    ctx: ServiceContext,
    principal: Principal,
    hotel_code: str,
    program_code: str,
    *,
    amount_fen: int | None = None,
    active: bool | None = None,
) -> HotelProgram:
    """Change a program's price or availability at one hotel; audited as old -> new.

    Orders already created keep the price they were created with.
    """
    if amount_fen is not None:
        check_price(amount_fen)
    with transaction(ctx.sessions) as session:
        hotel = _price_hotel(session, principal, hotel_code)
        program = session.scalars(
            select(Program)
            .where(Program.hotel_id == hotel.id, Program.code == program_code)
            .with_for_update()
        ).one_or_none()
        if program is None:
            raise not_found("unknown_program", f"no program {program_code!r} at this hotel")
        old = {"amount_fen": program.amount_fen, "active": program.active}
        if amount_fen is not None:
            program.amount_fen = amount_fen
        if active is not None:
            program.active = active
        new = {"amount_fen": program.amount_fen, "active": program.active}
        if new != old:
            changed = [k for k in old if old[k] != new[k]]
            audit(
                session,
                principal,
                ctx.clock.now(),
                "program_changed",
                f"{hotel.code}/{program.code}",
                hotel.id,
                old={k: old[k] for k in changed},
                new={k: new[k] for k in changed},
            )
        return _hotel_program(hotel, program)

"""What a guest can see and buy on a device."""

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.services.errors import not_found
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

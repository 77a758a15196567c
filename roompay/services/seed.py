"""The demo hotel: an operator, a hotel with rooms, appliances of all four kinds."""

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.domain.catalog import ApplianceKind, default_programs
from roompay.services.ledger import DEFAULT_CONTRACT, add_contract
from roompay.store.models import Device, Hotel, Operator, Program, Room

KIND_PREFIX = {
    ApplianceKind.CLOTHES_DRYER: "DRY",
    ApplianceKind.AIR_PURIFIER: "AIR",
    ApplianceKind.WATER_PURIFIER: "WTR",
    ApplianceKind.AROMA_DIFFUSER: "ARO",
}


@dataclass(frozen=True, slots=True)
class DemoData:
    """What the demo created or found."""

    hotel_code: str
    device_codes: list[str]
    created: bool


def ensure_operator(session: Session, code: str, name: str) -> Operator:
    """Find or create the operator."""
    operator = session.scalars(select(Operator).where(Operator.code == code)).one_or_none()
    if operator is None:
        operator = Operator(code=code, name=name)
        session.add(operator)
        session.flush()
    return operator


def create_hotel(session: Session, operator: Operator, code: str, name: str, rooms: int) -> Hotel:
    """Create a hotel with numbered rooms and the default programs and prices."""
    hotel = Hotel(operator_id=operator.id, code=code, name=name)
    session.add(hotel)
    session.flush()
    # New hotels start on the default terms (30 % of gross, from the epoch).
    add_contract(session, hotel.id, DEFAULT_CONTRACT, datetime.now(UTC))
    for index in range(rooms):
        floor, number = divmod(index, 20)
        session.add(Room(hotel_id=hotel.id, number=f"{floor + 1}{number + 1:02d}"))
    for program in default_programs():
        session.add(
            Program(
                hotel_id=hotel.id,
                code=program.code,
                kind=program.kind.value,
                name=program.name,
                duration_s=program.duration_s,
                amount_fen=program.amount_fen,
                active=True,
            )
        )
    session.flush()
    return hotel


def place_devices(session: Session, hotel: Hotel, count: int, code_prefix: str = "") -> list[str]:
    """Place `count` appliances, cycling through the four kinds, one per room."""
    rooms = list(session.scalars(select(Room).where(Room.hotel_id == hotel.id).order_by(Room.id)))
    kinds = list(ApplianceKind)
    codes = []
    for index in range(count):
        kind = kinds[index % len(kinds)]
        room = rooms[index % len(rooms)] if rooms else None
        code = f"{code_prefix}{KIND_PREFIX[kind]}-{index + 1:04d}"
        session.add(
            Device(
                code=code,
                kind=kind.value,
                hotel_id=hotel.id,
                room_id=room.id if room else None,
                online=False,
                boot_id=0,
                state="idle",
            )
        )
        codes.append(code)
    session.flush()
    return codes


def ensure_demo(session: Session, devices: int) -> DemoData:
    """Create the demo hotel once; on later starts return what is there."""
    hotel = session.scalars(select(Hotel).where(Hotel.code == "demo")).one_or_none()
    if hotel is not None:
        codes = list(
            session.scalars(
                select(Device.code).where(Device.hotel_id == hotel.id).order_by(Device.id)
            )
        )
        return DemoData(hotel.code, codes, created=False)
    operator = ensure_operator(session, "roompay", "Roompay Appliances Co.")
    hotel = create_hotel(session, operator, "demo", "Demo Hotel 示范酒店", rooms=max(devices, 8))
    codes = place_devices(session, hotel, devices)
    return DemoData(hotel.code, codes, created=True)

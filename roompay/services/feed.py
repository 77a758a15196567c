"""The live consumption feed: every step of every order, as staff of its hotel see it.

The feed is read from `order_events` by id, so any number of server processes and
subscribers follow the same sequence, and a subscriber resumes after the last id it saw.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Result, bindparam, func, select
from sqlalchemy.orm import Session

from roompay.store.models import Device, Hotel, Order, OrderEvent, Room

# The wallet of an order that staff started for free (a comp): no provider, no money.
COMP_WALLET = "comp"


@dataclass(frozen=True, slots=True)
class FeedItem:
    """One order step with what staff need to place it: where, what, how much."""

    id: int
    at: datetime
    event: str
    detail: dict[str, Any]
    order_id: str
    status: str
    hotel: str
    device: str
    kind: str
    room: str | None
    program: str
    wallet: str
    amount_fen: int
    hotel_id: int = 0  # for scoping subscribers; not sent

    def as_json(self) -> dict[str, Any]:
        """The item as a JSON-ready dict."""
        return {
            "id": self.id,
            "at": self.at.isoformat(),
            "event": self.event,
            "detail": self.detail,
            "order_id": self.order_id,
            "status": self.status,
            "hotel": self.hotel,
            "device": self.device,
            "kind": self.kind,
            "room": self.room,
            "program": self.program,
            "wallet": self.wallet,
            "amount_fen": self.amount_fen,
            "comp": self.comp,
        }

    @property
    def comp(self) -> bool:
        """Tell whether the order is a free run granted by staff (no money moved)."""
        return self.wallet == COMP_WALLET


_ITEMS = (
    select(
        OrderEvent.id,
        OrderEvent.at,
        OrderEvent.event,
        OrderEvent.detail,
        Order.id.label("order_id"),
        Order.status,
        Order.program_code,
        Order.wallet,
        Order.amount_fen,
        Order.hotel_id,
        Device.code.label("device"),
        Device.kind,
        Hotel.code.label("hotel"),
        Room.number.label("room"),
    )
    .join(Order, OrderEvent.order_id == Order.id)
    .join(Device, Order.device_id == Device.id)
    .join(Hotel, Order.hotel_id == Hotel.id)
    .outerjoin(Room, Device.room_id == Room.id)
    .order_by(OrderEvent.id)
)
# Built once with bind parameters: the live feed runs these many times a second, and
# building a statement costs more than running it.
_ITEMS_BY_ID = _ITEMS.where(OrderEvent.id.in_(bindparam("p_ids", expanding=True)))
_IDS_AFTER = (
    select(OrderEvent.id)
    .where(OrderEvent.id > bindparam("p_after"))
    .order_by(OrderEvent.id)
    .limit(bindparam("p_limit"))
)


def read_feed(
    session: Session, hotel_scope: int | None, after: int, limit: int = 200
) -> list[FeedItem]:
    """Order steps with an id above `after`, oldest first; only the hotel's unless scope is None."""
    query = _ITEMS.where(OrderEvent.id > after).limit(limit)
    if hotel_scope is not None:
        query = query.where(Order.hotel_id == hotel_scope)
    return _items(session.connection().execute(query))


def event_ids_after(session: Session, after: int, limit: int = 500) -> list[int]:
    """Ids of order steps above `after`, oldest first: a cheap look before reading items."""
    rows = session.connection().execute(_IDS_AFTER, {"p_after": after, "p_limit": limit})
    return list(rows.scalars())


def feed_items(session: Session, event_ids: list[int]) -> list[FeedItem]:
    """These order steps as the feed shows them, oldest first."""
    return _items(session.connection().execute(_ITEMS_BY_ID, {"p_ids": event_ids}))


def _items(rows: Result[Any]) -> list[FeedItem]:
    return [
        FeedItem(
            id=row.id,
            at=row.at,
            event=row.event,
            detail=dict(row.detail or {}),
            order_id=row.order_id,
            status=row.status,
            hotel=row.hotel,
            device=row.device,
            kind=row.kind,
            room=row.room,
            program=row.program_code,
            wallet=row.wallet,
            amount_fen=row.amount_fen,
            hotel_id=row.hotel_id,
        )
        for row in rows
    ]


def latest_event_id(session: Session) -> int:
    """The id of the newest order step of any hotel (0 when there is none): "from now on".

    Unscoped on purpose: a subscriber starting here misses nothing of its own hotel.
    """
    return int(session.scalar(select(func.max(OrderEvent.id))) or 0)

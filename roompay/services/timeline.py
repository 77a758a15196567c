"""The timeline of an order: every step it took, appended, never edited."""

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.store.models import OrderEvent


def record_event(session: Session, order_id: str, at: datetime, event: str, **detail: Any) -> None:
    """Append one step to an order's timeline."""
    session.add(OrderEvent(order_id=order_id, at=at, event=event, detail=detail))


def order_timeline(session: Session, order_id: str) -> list[OrderEvent]:
    """The order's events, oldest first."""
    query = select(OrderEvent).where(OrderEvent.order_id == order_id).order_by(OrderEvent.id)
    return list(session.scalars(query))

"""Reading orders and recording their timeline."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from roompay.services.errors import not_found
from roompay.services.refunds import refunded_total
from roompay.store.models import Device, Order


@dataclass(frozen=True, slots=True)
class OrderView:
    """An order as the guest's panel sees it."""

    order_id: str
    status: str
    device: str
    program: str
    wallet: str
    amount_fen: int
    duration_s: int
    created_at: datetime
    expires_at: datetime
    paid_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    actual_run_s: int | None
    refunded_fen: int


def get_order_view(session: Session, order_id: str) -> OrderView:
    """Load an order for display, or raise not_found."""
    row = session.execute(
        select(Order, Device.code)
        .join(Device, Order.device_id == Device.id)
        .where(Order.id == order_id)
    ).one_or_none()
    if row is None:
        raise not_found("unknown_order", "no such order")
    order, device_code = row
    return OrderView(
        order_id=order.id,
        status=order.status,
        device=device_code,
        program=order.program_code,
        wallet=order.wallet,
        amount_fen=order.amount_fen,
        duration_s=order.duration_s,
        created_at=order.created_at,
        expires_at=order.expires_at,
        paid_at=order.paid_at,
        started_at=order.started_at,
        ended_at=order.ended_at,
        actual_run_s=order.actual_run_s,
        refunded_fen=refunded_total(session, order.id),
    )


def count_by_status(session: Session) -> dict[str, int]:
    """How many orders are in each status."""
    rows = session.execute(select(Order.status, func.count()).group_by(Order.status))
    return dict(rows.all())


def qr_content(session: Session, order_id: str) -> str:
    """The provider QR content of an order, or raise not_found."""
    order = session.get(Order, order_id)
    if order is None or order.qr_content is None:
        raise not_found("unknown_order", "no QR code for this order")
    return order.qr_content

"""What hotel staff and the operator do to orders, checked against who they are.

Object-level checks live here, not in the views: a user of hotel A asking about an
order of hotel B is told it does not exist.
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.domain.orders import OrderStatus
from roompay.logs import order_context
from roompay.services.auth import Principal, Role
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError, conflict, invalid, not_found
from roompay.services.refunds import owed_total, paid_total, request_refund
from roompay.store.db import transaction
from roompay.store.models import AuditEntry, Command, Order, Refund

REFUND_ROLES = frozenset({Role.ADMIN, Role.MANAGER, Role.FRONT_DESK})
# A staff refund on an order whose start command may still run would let both happen.
SETTLED_STATES = frozenset(
    {OrderStatus.COMPLETED, OrderStatus.PARTIALLY_REFUNDED, OrderStatus.PAID}
)


@dataclass(frozen=True, slots=True)
class RefundView:
    """A refund as staff see it."""

    refund_key: str
    amount_fen: int
    reason: str
    status: str
    created_at: datetime
    note: str | None


def _view(refund: Refund) -> RefundView:
    return RefundView(
        refund.refund_key,
        refund.amount_fen,
        refund.reason,
        refund.status,
        refund.created_at,
        refund.note,
    )


def load_order_for(
    session: Session, principal: Principal, order_id: str, lock: bool = False
) -> Order:
    """The order if this user may see it; otherwise not_found, never a hint that it exists."""
    order = session.get(Order, order_id, with_for_update=lock)
    scope = principal.hotel_scope()
    if order is None or (scope is not None and order.hotel_id != scope):
        raise not_found("unknown_order", "no such order")
    return order


def audit(
    session: Session,
    principal: Principal,
    at: datetime,
    action: str,
    target: str,
    hotel_id: int | None,
    **detail: object,
) -> None:
    """Keep a staff action in the audit log."""
    session.add(
        AuditEntry(
            at=at,
            user_id=principal.user_id,
            hotel_id=hotel_id,
            action=action,
            target=target,
            detail={"by": principal.username, **detail},
        )
    )


def refund_order(
    ctx: ServiceContext,
    principal: Principal,
    order_id: str,
    amount_fen: int,
    reason: str,
    idempotency_key: str | None,
) -> RefundView:
    """Refund part or all of an order on a staff member's word, with a reason."""
    if principal.role not in REFUND_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot refund orders")
    with order_context(order_id), transaction(ctx.sessions) as session:
        order = load_order_for(session, principal, order_id, lock=True)
        key = _staff_key(order_id, principal, idempotency_key, ctx.ids.token(8))
        repeated = session.scalars(select(Refund).where(Refund.refund_key == key)).one_or_none()
        if repeated is not None:
            return _view(repeated)  # the same request again: the same refund, nothing new
        _check_refundable(session, order, amount_fen)
        refund = request_refund(
            ctx, session, order, amount_fen, "staff", key, principal.user_id, reason
        )
        if refund is None:
            raise conflict("nothing_to_refund", "this order has been refunded in full")
        audit(
            session,
            principal,
            ctx.clock.now(),
            "refund",
            order_id,
            order.hotel_id,
            amount_fen=refund.amount_fen,
            reason=reason,
            refund_key=key,
        )
        view = _view(refund)
    ctx.on_refunds_queued()
    return view


def _check_refundable(session: Session, order: Order, amount_fen: int) -> None:
    status = OrderStatus(order.status)
    if status not in SETTLED_STATES or (
        status is OrderStatus.PAID and _start_may_run(session, order)
    ):
        raise conflict(
            "order_not_refundable_now",
            f"an order that is {status} cannot be refunded now; refund it once it has ended",
        )
    room = paid_total(order) - owed_total(session, order.id)
    if amount_fen > room:
        raise invalid(
            "refund_exceeds_paid", f"at most {room} fen can still be refunded on this order"
        )


def _start_may_run(session: Session, order: Order) -> bool:
    open_commands = session.scalar(
        select(Command.id)
        .where(Command.order_id == order.id, Command.status.in_(("pending", "sent", "accepted")))
        .limit(1)
    )
    return open_commands is not None


def _staff_key(order_id: str, principal: Principal, idempotency_key: str | None, fresh: str) -> str:
    """One refund key per (order, staff request): a retried request refunds once."""
    seed = idempotency_key if idempotency_key is not None else fresh
    digest = hashlib.sha256(f"{principal.user_id}|{seed}".encode()).hexdigest()[:24]
    return f"{order_id[:32]}-s{digest}"


def list_refunds(ctx: ServiceContext, principal: Principal, order_id: str) -> list[RefundView]:
    """An order's refunds, oldest first: money, so not for technicians."""
    if principal.role not in REFUND_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot see refunds")
    with ctx.sessions() as session:
        load_order_for(session, principal, order_id)
        refunds = session.scalars(
            select(Refund).where(Refund.order_id == order_id).order_by(Refund.id)
        )
        return [_view(r) for r in refunds]

"""The order state machine.

An order moves only forward. The happy path is
awaiting_payment -> paid -> running -> completed; an unpaid order expires.
Refund states belong to paid orders whose appliance did not (fully) run.
"""

from enum import StrEnum

from roompay.domain.errors import InvalidTransitionError


class OrderStatus(StrEnum):
    """Where an order is in its life."""

    AWAITING_PAYMENT = "awaiting_payment"
    PAID = "paid"
    RUNNING = "running"
    COMPLETED = "completed"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"


_NEXT: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.AWAITING_PAYMENT: frozenset({OrderStatus.PAID, OrderStatus.EXPIRED}),
    # A payment that lands after expiry is still money received: it must end ran-or-refunded.
    OrderStatus.EXPIRED: frozenset({OrderStatus.PAID}),
    OrderStatus.PAID: frozenset({OrderStatus.RUNNING, OrderStatus.REFUNDED}),
    # A run always ends as completed; refunds for an early end follow from there.
    OrderStatus.RUNNING: frozenset({OrderStatus.COMPLETED}),
    OrderStatus.COMPLETED: frozenset({OrderStatus.PARTIALLY_REFUNDED, OrderStatus.REFUNDED}),
    OrderStatus.PARTIALLY_REFUNDED: frozenset({OrderStatus.REFUNDED}),
    OrderStatus.REFUNDED: frozenset(),
}

TERMINAL: frozenset[OrderStatus] = frozenset(s for s, nxt in _NEXT.items() if not nxt)


def can_move(current: OrderStatus, target: OrderStatus) -> bool:
    """Tell whether an order in `current` may move to `target`."""
    return target in _NEXT[current]


def move(current: OrderStatus, target: OrderStatus) -> OrderStatus:
    """Return `target` if the move is allowed, else raise InvalidTransitionError."""
    if not can_move(current, target):
        raise InvalidTransitionError(f"order cannot move from {current} to {target}")
    return target


def status_after_refunds(current: OrderStatus, amount_fen: int, refunded_fen: int) -> OrderStatus:
    """The status an order shows once `refunded_fen` of its `amount_fen` went back.

    All of it back: refunded. Part of it back after the run: partially refunded.
    Otherwise the status does not change (a running order settles when it ends).
    Nothing back is never "refunded", even for a free (comp) order of 0 fen.
    """
    if refunded_fen > 0 and refunded_fen >= amount_fen and can_move(current, OrderStatus.REFUNDED):
        return OrderStatus.REFUNDED
    if 0 < refunded_fen < amount_fen and can_move(current, OrderStatus.PARTIALLY_REFUNDED):
        return OrderStatus.PARTIALLY_REFUNDED
    return current


def is_paid_state(status: OrderStatus) -> bool:
    """Tell whether money has been received for an order in this state."""
    return status in {
        OrderStatus.PAID,
        OrderStatus.RUNNING,
        OrderStatus.COMPLETED,
        OrderStatus.REFUNDED,
        OrderStatus.PARTIALLY_REFUNDED,
    }

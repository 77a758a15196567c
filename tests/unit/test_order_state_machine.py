"""The order state machine: the exact table of moves and its invariants under random moves."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from roompay.domain.errors import InvalidTransitionError
from roompay.domain.orders import (
    TERMINAL,
    OrderStatus,
    can_move,
    is_paid_state,
    move,
    status_after_refunds,
)

S = OrderStatus

ALLOWED_MOVES: frozenset[tuple[OrderStatus, OrderStatus]] = frozenset(
    {
        (S.AWAITING_PAYMENT, S.PAID),
        (S.AWAITING_PAYMENT, S.EXPIRED),
        (S.EXPIRED, S.PAID),  # a payment that lands after expiry is still money received
        (S.PAID, S.RUNNING),
        (S.PAID, S.REFUNDED),
        (S.RUNNING, S.COMPLETED),  # a run always ends as completed, even an early end
        (S.COMPLETED, S.PARTIALLY_REFUNDED),
        (S.COMPLETED, S.REFUNDED),
        (S.PARTIALLY_REFUNDED, S.REFUNDED),
    }
)

UNPAID: frozenset[OrderStatus] = frozenset({S.AWAITING_PAYMENT, S.EXPIRED})

# How far along its life an order is; a move never lowers it.
RANK: dict[OrderStatus, int] = {
    S.AWAITING_PAYMENT: 0,
    S.EXPIRED: 0,
    S.PAID: 1,
    S.RUNNING: 2,
    S.COMPLETED: 3,
    S.PARTIALLY_REFUNDED: 4,
    S.REFUNDED: 5,
}

EVERY_PAIR = list(itertools.product(OrderStatus, OrderStatus))


def test_the_statuses_and_their_values_are_exactly_these() -> None:
    assert [(s.name, s.value) for s in OrderStatus] == [
        ("AWAITING_PAYMENT", "awaiting_payment"),
        ("PAID", "paid"),
        ("RUNNING", "running"),
        ("COMPLETED", "completed"),
        ("EXPIRED", "expired"),
        ("REFUNDED", "refunded"),
        ("PARTIALLY_REFUNDED", "partially_refunded"),
    ]


def test_can_move_allows_exactly_the_table_of_moves() -> None:
    allowed = {(current, target) for current, target in EVERY_PAIR if can_move(current, target)}

    assert allowed == ALLOWED_MOVES


def test_the_only_terminal_state_is_refunded() -> None:
    assert frozenset({S.REFUNDED}) == TERMINAL


@pytest.mark.parametrize("status", list(OrderStatus))
def test_no_status_may_move_to_itself(status: OrderStatus) -> None:
    assert can_move(status, status) is False


@pytest.mark.parametrize(
    ("status", "paid"),
    [
        (S.AWAITING_PAYMENT, False),
        (S.EXPIRED, False),
        (S.PAID, True),
        (S.RUNNING, True),
        (S.COMPLETED, True),
        (S.REFUNDED, True),
        (S.PARTIALLY_REFUNDED, True),
    ],
)
def test_is_paid_state_tells_whether_money_was_received(status: OrderStatus, paid: bool) -> None:
    assert is_paid_state(status) is paid


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED_MOVES))
def test_move_when_allowed_returns_the_target(current: OrderStatus, target: OrderStatus) -> None:
    assert move(current, target) is target


@pytest.mark.parametrize(
    ("current", "target"),
    [pair for pair in EVERY_PAIR if pair not in ALLOWED_MOVES],
)
def test_move_when_forbidden_raises_naming_both_states(
    current: OrderStatus, target: OrderStatus
) -> None:
    with pytest.raises(
        InvalidTransitionError,
        match=f"^order cannot move from {current.value} to {target.value}$",
    ):
        move(current, target)


def test_a_paid_order_cannot_go_back_to_awaiting_payment() -> None:
    with pytest.raises(
        InvalidTransitionError, match=r"^order cannot move from paid to awaiting_payment$"
    ):
        move(S.PAID, S.AWAITING_PAYMENT)


@pytest.mark.parametrize(
    ("current", "refunded_fen", "expected"),
    [
        (S.COMPLETED, 800, S.REFUNDED),
        (S.COMPLETED, 900, S.REFUNDED),
        (S.COMPLETED, 300, S.PARTIALLY_REFUNDED),
        (S.COMPLETED, 0, S.COMPLETED),
        (S.PARTIALLY_REFUNDED, 500, S.PARTIALLY_REFUNDED),
        (S.PARTIALLY_REFUNDED, 800, S.REFUNDED),
        (S.PAID, 800, S.REFUNDED),
        (S.PAID, 300, S.PAID),
        (S.RUNNING, 800, S.RUNNING),
        (S.RUNNING, 300, S.RUNNING),
        (S.REFUNDED, 800, S.REFUNDED),
        (S.AWAITING_PAYMENT, 800, S.AWAITING_PAYMENT),
        (S.EXPIRED, 800, S.EXPIRED),
    ],
)
def test_status_after_refunds_of_an_800_fen_order(
    current: OrderStatus, refunded_fen: int, expected: OrderStatus
) -> None:
    assert status_after_refunds(current, 800, refunded_fen) is expected


@pytest.mark.parametrize("current", [S.PAID, S.COMPLETED])
def test_a_free_order_with_nothing_refunded_is_not_refunded(current: OrderStatus) -> None:
    assert status_after_refunds(current, 0, 0) is current


@given(
    current=st.sampled_from(OrderStatus),
    amount_fen=st.integers(min_value=1, max_value=10_000_000),
    refunded_fen=st.integers(min_value=0, max_value=20_000_000),
)
def test_status_after_refunds_stays_put_or_makes_an_allowed_move(
    current: OrderStatus, amount_fen: int, refunded_fen: int
) -> None:
    after = status_after_refunds(current, amount_fen, refunded_fen)

    assert after is current or can_move(current, after)


class OrderLifecycle(RuleBasedStateMachine):
    """One order pushed towards random statuses, through `move` only."""

    def __init__(self) -> None:
        super().__init__()
        self.status = S.AWAITING_PAYMENT
        self.history: list[OrderStatus] = []

    @initialize(start=st.sampled_from(OrderStatus))
    def start_somewhere(self, start: OrderStatus) -> None:
        # Given an order in any status
        self.status = start
        self.history = [start]

    @rule(wanted=st.sampled_from(OrderStatus))
    def try_to_move(self, wanted: OrderStatus) -> None:
        before = self.status
        # When it is asked to move to a random status
        try:
            after = move(before, wanted)
        except InvalidTransitionError:
            # Then a refused move is one the table forbids, and the order stays as it was
            assert (before, wanted) not in ALLOWED_MOVES
            assert self.status is before
            return
        # Then an accepted move is in the table and lands exactly on the wanted status
        assert (before, wanted) in ALLOWED_MOVES
        assert after is wanted
        assert before not in TERMINAL
        self.status = after
        self.history.append(after)

    @invariant()
    def terminal_states_never_move(self) -> None:
        first_terminal = next((i for i, s in enumerate(self.history) if s in TERMINAL), None)
        if first_terminal is not None:
            assert self.history[first_terminal:] == [self.history[first_terminal]]

    @invariant()
    def once_paid_never_unpaid_again(self) -> None:
        first_paid = next((i for i, s in enumerate(self.history) if is_paid_state(s)), None)
        if first_paid is not None:
            assert all(s not in UNPAID for s in self.history[first_paid:])
            assert is_paid_state(self.status)

    @invariant()
    def moves_only_go_forward(self) -> None:
        for before, after in itertools.pairwise(self.history):
            # Awaiting payment -> expired is the only move that keeps the rank
            assert RANK[after] > RANK[before] or (before, after) == (S.AWAITING_PAYMENT, S.EXPIRED)

    @invariant()
    def the_status_is_the_last_one_reached(self) -> None:
        assert self.history == [] or self.status is self.history[-1]


TestOrderLifecycle = OrderLifecycle.TestCase

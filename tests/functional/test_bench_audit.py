"""The bench's audit finds what would break the money invariants, on both databases."""

from sqlalchemy import select, text

from roompay.bench.audit import audit, violations
from roompay.domain.catalog import Wallet
from roompay.payments.base import TradeState
from roompay.services.payments import NotifyOutcome, PaymentEvidence, apply_evidence
from roompay.store.db import transaction
from roompay.store.models import Device, Order
from tests.support.server import Stack


def _paid_order(stack: Stack) -> str:
    """An order checked out through the API and paid by the provider's evidence."""
    code = stack.device_codes[0]
    with transaction(stack.runtime.ctx.sessions) as session:
        session.scalars(select(Device).where(Device.code == code)).one().online = True
    with stack.client() as http:
        reply = http.post(
            "/api/v1/checkout", json={"device": code, "program": "dry30", "wallet": "wechat"}
        )
    assert reply.status_code in (200, 201), reply.text
    order_id = str(reply.json()["order_id"])
    with stack.runtime.ctx.sessions() as session:
        amount = session.scalars(select(Order.amount_fen).where(Order.id == order_id)).one()
    evidence = PaymentEvidence(
        Wallet.WECHAT,
        order_id,
        f"trade-{order_id}",
        TradeState.SUCCESS,
        amount,
        stack.clock.now(),
        f"notify-{order_id}",
    )
    assert apply_evidence(stack.runtime.ctx, evidence) is NotifyOutcome.PAID
    return order_id


def test_a_paid_order_that_never_ran_and_an_unbalanced_entry_are_counted(
    quiet_stack: Stack,
) -> None:
    database_url = quiet_stack.settings.resolved_database_url
    # Given an order paid, booked and commanded, but never started
    _paid_order(quiet_stack)

    first = audit(database_url)

    # Then it is booked once, but neither ran nor ended: two broken invariants
    assert (first["orders"], first["paid"], first["paid_not_booked_once"]) == (1, 1, 0)
    assert (first["paid_not_run_once"], first["paid_in_flight"]) == (1, 1)
    assert (first["unbalanced_entries"], first["ledger_sum_fen"]) == (0, 0)
    assert violations(first) == 2

    # And when one of its ledger lines is off by one fen, the entry and the books say so
    with transaction(quiet_stack.runtime.ctx.sessions) as session:
        session.execute(
            text(
                "UPDATE ledger_lines SET debit_fen = debit_fen + 1"
                " WHERE id = (SELECT min(id) FROM ledger_lines WHERE debit_fen > 0)"
            )
        )
    second = audit(database_url)
    assert (second["unbalanced_entries"], second["ledger_sum_fen"]) == (1, 1)
    assert violations(second) == 4

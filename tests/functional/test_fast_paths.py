"""The hot path's Core statements write what the ORM path writes, under each hotel's own terms.

A first payment of the right amount takes `payments.pay_and_start` (prepared Core
statements); every other case takes the ORM path. Both must book the same entry with
the contract and fee schedule in force for *that* hotel and wallet on the payment's
day, queue the same signed command and record the same steps: the figures here come
from the domain rules, never from the code under test.
"""

from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from roompay.domain import ledger as rules
from roompay.domain.catalog import Wallet
from roompay.payments.base import TradeState
from roompay.protocol.messages import StartCommand
from roompay.protocol.signing import device_key, verify_command
from roompay.services.context import OrderDevices
from roompay.services.ledger import add_contract, hotel_contracts
from roompay.services.payments import (
    NotifyOutcome,
    PaymentEvidence,
    _apply,
    apply_evidence,
    writer_key,
)
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import transaction
from roompay.store.models import (
    Command,
    Device,
    LedgerEntry,
    LedgerLine,
    Order,
    OrderEvent,
    PaymentNotice,
    Program,
    ProviderFeeSchedule,
    RunEventRecord,
)
from roompay.store.writer import run_alone
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.timeline import PAID_RUN_STEPS
from tests.support.waiting import wait_for

_serial = count()

terms = st.tuples(
    st.integers(0, 10_000),  # share_bp
    st.sampled_from(list(rules.ShareBasis)),
    st.integers(-400, 1),  # starts this many days from the payment's day (1: tomorrow)
)


def _hotel_with(stack: Stack, contracts: list[tuple[int, rules.ShareBasis, int]]) -> str:
    """A hotel with one appliance, the default terms and these contracts; its device code."""
    n = next(_serial)
    day = rules.beijing_day(stack.clock.now())
    with transaction(stack.runtime.ctx.sessions) as session:
        operator = ensure_operator(session, "op", "Op")
        hotel = create_hotel(session, operator, f"fp{n}", f"Fast path {n}", 1)
        by_day = {offset: (share_bp, basis) for share_bp, basis, offset in contracts}
        for offset, (share_bp, basis) in by_day.items():  # one contract per hotel and day
            when = day + timedelta(days=offset)
            add_contract(
                session, hotel.id, rules.HotelContract(when, share_bp, basis, 0), stack.clock.now()
            )
        return place_devices(session, hotel, 1, code_prefix=f"FP{n}")[0]


def _order(stack: Stack, device_code: str, wallet: Wallet, program: str = "dry30") -> Order:
    now = stack.clock.now()
    with transaction(stack.runtime.ctx.sessions) as session:
        device = session.scalars(select(Device).where(Device.code == device_code)).one()
        chosen = session.scalars(
            select(Program).where(Program.hotel_id == device.hotel_id, Program.code == program)
        ).one()
        order = Order(
            id=f"fp-{next(_serial)}-{device_code}",
            device_id=device.id,
            hotel_id=device.hotel_id,
            program_id=chosen.id,
            program_code=chosen.code,
            wallet=wallet.value,
            amount_fen=chosen.amount_fen,
            duration_s=chosen.duration_s,
            status="awaiting_payment",
            request_fingerprint="test",
            created_at=now,
            expires_at=now + timedelta(minutes=5),
        )
        session.add(order)
        return order


def _evidence(order: Order, paid_at: datetime) -> PaymentEvidence:
    return PaymentEvidence(
        Wallet(order.wallet),
        order.id,
        f"trade-{order.id}",
        TradeState.SUCCESS,
        order.amount_fen,
        paid_at,
        f"notify-{order.id}",
    )


def _expected_lines(stack: Stack, order: Order, paid_at: datetime) -> list[tuple[str, int, int]]:
    """The payment's lines as the domain rules book them with the terms in force."""
    day = rules.beijing_day(paid_at)
    with stack.runtime.ctx.sessions() as session:
        contract = rules.in_force(hotel_contracts(session, order.hotel_id), day)
        fees = rules.in_force(
            [
                rules.FeeSchedule(r.effective_from, r.rate_bp, rules.RefundFeeRule(r.refund_rule))
                for r in session.scalars(
                    select(ProviderFeeSchedule).where(ProviderFeeSchedule.wallet == order.wallet)
                )
            ],
            day,
        )
    posting = rules.payment_posting(
        order.id, order.wallet, order.hotel_id, order.amount_fen, fees, contract
    )
    return sorted((line.account, line.debit_fen, line.credit_fen) for line in posting.lines)


def _written(stack: Stack, order_id: str) -> dict[str, Any]:
    """Everything the payment wrote, with the order's id as ORDER and no row ids or times."""
    with stack.runtime.ctx.sessions() as session:
        entry = session.scalars(select(LedgerEntry).where(LedgerEntry.order_id == order_id)).one()
        lines = session.scalars(select(LedgerLine).where(LedgerLine.entry_id == entry.id)).all()
        command = session.scalars(select(Command).where(Command.order_id == order_id)).one()
        steps = session.scalars(
            select(OrderEvent).where(OrderEvent.order_id == order_id).order_by(OrderEvent.id)
        ).all()
        notice = session.scalars(
            select(PaymentNotice).where(PaymentNotice.order_id == order_id)
        ).one()
        order = session.get_one(Order, order_id)
        payload = {
            k: v
            for k, v in command.payload.items()
            if k not in ("cmd_id", "sig", "seq", "issued_at", "expires_at")
        }
        written = {
            "order": (order.status, order.paid_amount_fen, order.provider_trade_no),
            "entry": (entry.kind, entry.source_key, entry.booked_on, entry.hotel_id, entry.wallet),
            "lines": sorted((x.account, x.debit_fen, x.credit_fen) for x in lines),
            "command": (command.kind, command.status, command.attempts, payload),
            "steps": [
                (s.event, {k: v for k, v in s.detail.items() if k != "cmd_id"}) for s in steps
            ],
            "notice": (notice.wallet, notice.amount_fen, notice.trade_state, notice.outcome),
        }
    return _anonymous(written, order_id)


def _anonymous(value: Any, order_id: str) -> Any:
    if isinstance(value, str):
        return value.replace(order_id, "ORDER")
    if isinstance(value, dict):
        return {k: _anonymous(v, order_id) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_anonymous(v, order_id) for v in value)
    return value


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    first=st.lists(terms, max_size=3),
    second=st.lists(terms, max_size=3),
    wallet=st.sampled_from([Wallet.WECHAT, Wallet.ALIPAY]),
)
def test_each_hotel_is_booked_with_its_own_terms_on_the_day_of_payment(
    quiet_stack: Stack,
    first: list[tuple[int, rules.ShareBasis, int]],
    second: list[tuple[int, rules.ShareBasis, int]],
    wallet: Wallet,
) -> None:
    stack = quiet_stack
    # Given two hotels with different contracts (some starting tomorrow)
    devices = [_hotel_with(stack, first), _hotel_with(stack, second)]
    paid_at = stack.clock.now()
    for device in devices:
        order = _order(stack, device, wallet)
        # When its guest's payment is applied
        outcome = apply_evidence(stack.runtime.ctx, _evidence(order, paid_at))
        # Then it is booked with that hotel's terms in force today, to the fen
        assert outcome is NotifyOutcome.PAID
        assert _written(stack, order.id)["lines"] == _expected_lines(stack, order, paid_at)


def test_the_fast_path_writes_what_the_orm_path_writes(quiet_stack: Stack) -> None:
    stack = quiet_stack
    device = _hotel_with(
        stack, [(4500, rules.ShareBasis.NET, -3), (9000, rules.ShareBasis.GROSS, 1)]
    )
    ctx = stack.runtime.ctx
    # Given two equal orders paid at the same moment, one through each path
    paid_at = stack.clock.now() - timedelta(seconds=30)
    fast, orm = _order(stack, device, Wallet.WECHAT), _order(stack, device, Wallet.WECHAT)
    assert apply_evidence(ctx, _evidence(fast, paid_at)) is NotifyOutcome.PAID
    orm_outcome = run_alone(
        ctx.sessions, lambda session, _after: _apply(ctx, session, _evidence(orm, paid_at))
    )
    assert orm_outcome is NotifyOutcome.PAID
    # Then they wrote the same rows, but for their own ids
    by_fast, by_orm = _written(stack, fast.id), _written(stack, orm.id)
    assert by_fast == by_orm
    assert by_fast["lines"] == _anonymous(_expected_lines(stack, fast, paid_at), fast.id)
    assert by_fast["steps"] == [
        ("paid", {"provider_trade_no": "trade-ORDER", "late": False, "source": "notify"}),
        ("command_queued", {}),
    ]
    # And each command is signed for the device, with the numbers rising by one
    key = device_key(ctx.settings.secret_key.encode(), device, "k1")
    with ctx.sessions() as session:
        rows = session.scalars(
            select(Command)
            .where(Command.order_id.in_([fast.id, orm.id]))
            .order_by(Command.created_at)
        ).all()
        seq = session.scalars(select(Device.command_seq).where(Device.code == device)).one()
    commands = [StartCommand.model_validate(row.payload) for row in rows]
    assert all(verify_command(command, key, device) for command in commands)
    assert sorted(command.seq for command in commands) == [seq - 1, seq]


def test_a_payment_on_the_day_a_contract_starts_uses_it_and_the_day_before_does_not(
    quiet_stack: Stack,
) -> None:
    stack = quiet_stack
    # Given a hotel whose new 80 % contract starts on a Beijing day
    day = rules.beijing_day(stack.clock.now())
    device = _hotel_with(stack, [(8000, rules.ShareBasis.GROSS, 0)])
    start = datetime(day.year, day.month, day.day, tzinfo=rules.BEIJING).astimezone(UTC)
    for paid_at, share in ((start - timedelta(seconds=1), 3000), (start, 8000)):
        order = _order(stack, device, Wallet.ALIPAY)
        # When a payment is made a second before it starts, and as it starts
        apply_evidence(stack.runtime.ctx, _evidence(order, paid_at))
        # Then the first is booked on the old 30 % and the second on the new 80 %
        hotel_line = next(
            line for line in _written(stack, order.id)["lines"] if line[0].startswith("hotel")
        )
        assert hotel_line[2] == order.amount_fen * share // 10_000
        assert _written(stack, order.id)["entry"][2] == rules.beijing_day(paid_at)


def test_a_payment_with_no_terms_in_force_is_refused_and_writes_nothing(
    quiet_stack: Stack,
) -> None:
    stack = quiet_stack
    device = _hotel_with(stack, [])
    order = _order(stack, device, Wallet.WECHAT)
    # Given a payment dated before any contract or fee schedule began
    before_any_terms = datetime(1969, 12, 31, 12, tzinfo=UTC)
    # When it is applied, then it is refused loudly
    with pytest.raises(rules.LedgerError, match="in force"):
        apply_evidence(stack.runtime.ctx, _evidence(order, before_any_terms))
    # And nothing of it stayed: the order still awaits payment, no entry, no command
    with stack.runtime.ctx.sessions() as session:
        assert session.get_one(Order, order.id).status == "awaiting_payment"
        for table in (LedgerEntry, Command, PaymentNotice):
            assert session.scalars(select(table).where(table.order_id == order.id)).all() == []


def test_payment_evidence_goes_to_the_writer_of_its_appliance(quiet_stack: Stack) -> None:
    ctx = quiet_stack.runtime.ctx
    code = _hotel_with(quiet_stack, [])
    # An order not checked out by this process (another server, or before a restart)
    order = _order(quiet_stack, code, Wallet.WECHAT)
    assert ctx.order_devices.get(order.id) is None
    assert writer_key(ctx, order.id) == code
    # A recent checkout's appliance is known without a query
    ctx.order_devices.remember("recent-order", "AIR-0042")
    assert writer_key(ctx, "recent-order") == "AIR-0042"
    # No such order: its job locks no appliance, any writer will do
    assert writer_key(ctx, "no-such-order") == "no-such-order"


def test_a_checkout_remembers_its_appliance_and_old_ones_are_forgotten(
    quiet_stack: Stack,
) -> None:
    code = quiet_stack.device_codes[0]
    with transaction(quiet_stack.runtime.ctx.sessions) as session:
        session.scalars(select(Device).where(Device.code == code)).one().online = True
    with quiet_stack.client() as http:
        reply = http.post(
            "/api/v1/checkout",
            json={"device": code, "program": "dry30", "wallet": "wechat"},
        )
    assert reply.status_code in (200, 201), reply.text
    assert quiet_stack.runtime.ctx.order_devices.get(reply.json()["order_id"]) == code
    recent = OrderDevices(limit=2)
    for n in range(3):
        recent.remember(f"o{n}", f"D{n}")
    assert [recent.get(f"o{n}") for n in range(3)] == [None, "D1", "D2"]


def test_a_paid_order_runs_with_each_answer_and_step_recorded_by_the_fast_paths(
    stack: Stack,
) -> None:
    """Through the running server, on both backends: the payment, the device's accepted
    answer, its `started` and its `ended` all take the fast paths (on PostgreSQL, the
    statements psycopg runs itself) and record what the ORM path would."""
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        response = http.post(
            "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": "wechat"}
        )
        assert response.status_code == 201, response.text
        order_id = response.json()["order_id"]
        qr = response.json()["qr"]
        assert http.post("/sandbox/pay", json={"qr": qr}).status_code == 200
        wait_for(
            lambda: http.get(f"/api/v1/orders/{order_id}").json()["status"] == "completed",
            20,
            "completed",
        )
    with stack.runtime.ctx.sessions() as session:
        command = session.scalars(select(Command).where(Command.order_id == order_id)).one()
        steps = session.execute(
            select(OrderEvent.event, OrderEvent.detail)
            .where(OrderEvent.order_id == order_id)
            .order_by(OrderEvent.id)
        ).all()
        runs = session.scalars(
            select(RunEventRecord).where(RunEventRecord.order_id == order_id)
        ).all()
        order = session.get_one(Order, order_id)
        appliance = session.scalars(select(Device).where(Device.code == device)).one()
    # The start command was answered once: accepted, after it was written
    assert (command.kind, command.status, command.answer) == ("start", "accepted", "accepted")
    assert command.answered_at is not None
    assert command.answered_at.tzinfo is UTC
    assert command.answered_at >= command.created_at
    # The timeline holds each step once, in order, with the run the device named
    started = next(run for run in runs if run.event == "started")
    assert [event for event, _ in steps] == PAID_RUN_STEPS
    assert steps[4][1] == {"cmd_id": command.id}
    assert steps[5][1] == {"cmd_id": command.id, "run_id": started.run_id}
    assert steps[6][1] == {"run_id": started.run_id}
    assert steps[7][1] == {"reason": "completed", "actual_run_s": started.remaining_s}
    # The order ran for its program and the appliance is free again
    assert (order.status, order.end_reason) == ("completed", "completed")
    assert order.started_at is not None
    assert order.started_at.tzinfo is UTC
    assert (appliance.state, appliance.current_order_id) == ("idle", None)

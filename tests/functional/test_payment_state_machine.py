"""Hypothesis drives one order through any interleaving of the events of its life.

Notifications (and their duplicates), active queries, expiry with close, late
payments, start deadlines, device answers, staff refunds and the refund worker
arrive in any order; after every step the money invariants must hold, and once
everything has settled every paid order must have run or been refunded.

The provider side is the real sandbox over HTTP with real signatures; its
notifications are held back and delivered (or not, or twice) by the rules.
"""

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select, update

from roompay.domain.catalog import Wallet
from roompay.protocol.messages import (
    AckStatus,
    CommandAck,
    EndReason,
    RunAck,
    RunEvent,
    RunEventKind,
    StartCommand,
    encode,
)
from roompay.protocol.topics import ParsedTopic
from roompay.services.auth import Principal, Role, create_user
from roompay.services.devices import handle_device_message
from roompay.services.dispatch import dispatch_due
from roompay.services.errors import ServiceError
from roompay.services.expiry import sweep_unpaid
from roompay.services.refunds import owed_total, paid_total, process_due_refunds, refunded_total
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.services.staff import refund_order
from roompay.store.db import transaction
from roompay.store.models import Command, Device, Order, PaymentNotice, Refund
from tests.support.server import Stack
from tests.support.waiting import wait_for

RANK = {
    "awaiting_payment": 0,
    "expired": 1,
    "paid": 2,
    "running": 3,
    "completed": 4,
    "partially_refunded": 5,
    "refunded": 6,
}


class RecordingPublisher:
    """The device link seen from the dispatcher: records what it publishes."""

    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, StartCommand]] = []

    def publish_start(self, code: str, command: StartCommand) -> None:
        self.sent.append((code, command))

    def publish_run_ack(self, code: str, ack: RunAck) -> None:
        """Run events are acknowledged by the rules themselves."""


def test_any_interleaving_keeps_the_money_invariants(quiet_stack: Stack) -> None:
    stack = quiet_stack
    with transaction(stack.runtime.ctx.sessions) as session:
        hotel = create_hotel(session, ensure_operator(session, "op", "Op"), "sm", "SM Hotel", 2)
        hotel_id = hotel.id
        admin = create_user(session, "sm-admin", "pw", Role.ADMIN, None, stack.clock.now())
        staff = Principal(admin.id, admin.username, Role.ADMIN, None)
    counter = iter(range(10_000))

    class OneOrder(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ctx = stack.runtime.ctx
            self.http = stack.client()
            self.publisher = RecordingPublisher()
            with transaction(self.ctx.sessions) as session:
                hotel_row = session.get_one(type(hotel), hotel_id)
                self.device = place_devices(session, hotel_row, 1, code_prefix=f"S{next(counter)}")[
                    0
                ]
                session.execute(
                    update(Device).where(Device.code == self.device).values(online=True)
                )
            self.order: dict[str, Any] | None = None
            self.notifies: list[Any] = []
            held = stack.notify_wire.held or []
            self.seen_wechat = {r.content for r in held}
            self.guest_paid = False
            self.previous_rank = 0
            self.run_reported = False

        def teardown(self) -> None:
            try:
                if self.order is not None:
                    self._settle()
            finally:
                self.http.close()

        # --- what happens ---------------------------------------------------------

        @precondition(lambda self: self.order is None)
        @rule(wallet=st.sampled_from([Wallet.WECHAT, Wallet.ALIPAY]))
        def checkout(self, wallet: Wallet) -> None:
            response = self.http.post(
                "/api/v1/checkout",
                json={"device": self.device, "program": "dry30", "wallet": wallet},
            )
            assert response.status_code == 201, response.text
            self.order = response.json()

        @precondition(lambda self: self.order is not None and not self.guest_paid)
        @rule()
        def guest_pays(self) -> None:
            assert self.order is not None
            paid = self.http.post("/sandbox/pay", json={"qr": self.order["qr"]})
            # A closed WeChat order can no longer be paid; that is the provider's answer
            assert paid.status_code in (200, 409), paid.text
            self.guest_paid = paid.status_code == 200
            if self.guest_paid:
                # The provider's first notification, held back on the wire; the rules deliver it
                held = stack.notify_wire.held
                assert held is not None
                wait_for(lambda: any(self._ours(r) for r in held), 10, "the notification")
                self.notifies.append(next(r for r in held if self._ours(r)))

        def _ours(self, request: Any) -> bool:
            assert self.order is not None
            content: bytes = request.content
            if b"out_trade_no=" in content:
                return self.order["order_id"].encode() in content
            return request.url.path.endswith("wechatpay") and self._wechat_is_ours(content)

        def _wechat_is_ours(self, content: bytes) -> bool:
            # The resource is encrypted; each example has one order, so any held WeChat
            # notify after this example's payment that we have not seen is ours.
            return content not in self.seen_wechat

        @precondition(lambda self: bool(self.notifies))
        @rule()
        def deliver_the_notify(self) -> None:
            # The provider delivers (again): each attempt signed afresh, as providers do
            answer = self._deliver(self.notifies[0])
            assert answer.status_code in (200, 204), answer.text
            assert answer.content in (b"", b"success")

        @precondition(lambda self: self.order is not None)
        @rule()
        def time_passes_and_jobs_run(self) -> None:
            stack.clock.advance(self.ctx.settings.query_interval_s + 1)
            sweep_unpaid(self.ctx)
            dispatch_due(self.ctx, self.publisher)
            process_due_refunds(self.ctx)

        @precondition(lambda self: self.order is not None)
        @rule()
        def checkout_expires(self) -> None:
            stack.clock.advance(self.ctx.settings.checkout_ttl_s + 1)
            sweep_unpaid(self.ctx)

        @precondition(lambda self: self.order is not None)
        @rule()
        def start_deadline_passes(self) -> None:
            stack.clock.advance(self.ctx.settings.start_deadline_s + 1)
            dispatch_due(self.ctx, self.publisher)

        @precondition(lambda self: bool(self.publisher.sent) and not self.run_reported)
        @rule(early_end=st.sampled_from([None, 0, 30, 900]))
        def appliance_runs(self, early_end: int | None) -> None:
            _code, command = self.publisher.sent[-1]
            now = stack.clock.now()
            run_id = f"run-{command.cmd_id}"
            self._device_says(
                "ack",
                CommandAck(cmd_id=command.cmd_id, status=AckStatus.ACCEPTED, run_id=run_id, ts=now),
            )
            self._device_says(
                "run",
                RunEvent(
                    run_id=run_id,
                    cmd_id=command.cmd_id,
                    order_id=command.order_id,
                    event=RunEventKind.STARTED,
                    seq=0,
                    elapsed_s=0,
                    remaining_s=command.duration_s,
                    ts=now,
                ),
            )
            ran = command.duration_s if early_end is None else early_end
            self._device_says(
                "run",
                RunEvent(
                    run_id=run_id,
                    cmd_id=command.cmd_id,
                    order_id=command.order_id,
                    event=RunEventKind.ENDED,
                    seq=1,
                    elapsed_s=ran,
                    remaining_s=command.duration_s - ran,
                    ts=now,
                    reason=EndReason.COMPLETED if early_end is None else EndReason.FAULT,
                    actual_run_s=ran,
                ),
            )
            self.run_reported = True

        @precondition(lambda self: bool(self.publisher.sent) and not self.run_reported)
        @rule()
        def appliance_refuses(self) -> None:
            _code, command = self.publisher.sent[-1]
            ack = CommandAck(
                cmd_id=command.cmd_id,
                status=AckStatus.REJECTED,
                reason="busy",
                ts=stack.clock.now(),
            )
            self._device_says("ack", ack)

        @precondition(lambda self: self.order is not None)
        @rule(amount=st.integers(min_value=1, max_value=900))
        def staff_refund(self, amount: int) -> None:
            assert self.order is not None
            refused = None
            try:
                refund_order(
                    self.ctx, staff, self.order["order_id"], amount, "guest complaint", None
                )
            except ServiceError as exc:
                refused = exc.code
            assert refused in {
                None,
                "order_not_refundable_now",
                "refund_exceeds_paid",
                "nothing_to_refund",
            }

        # --- what must always hold ---------------------------------------------------

        @invariant()
        def money_and_state_invariants(self) -> None:
            if self.order is None:
                return
            with self.ctx.sessions() as session:
                order = session.get_one(Order, self.order["order_id"])
                rank = RANK[order.status]
                # Order states only move forward
                assert rank >= self.previous_rank, (order.status, self.previous_rank)
                self.previous_rank = rank
                commands = (
                    session.scalar(
                        select(func.count())
                        .select_from(Command)
                        .where(Command.order_id == order.id)
                    )
                    or 0
                )
                paid_notices = (
                    session.scalar(
                        select(func.count())
                        .select_from(PaymentNotice)
                        .where(
                            PaymentNotice.order_id == order.id, PaymentNotice.outcome.like("paid%")
                        )
                    )
                    or 0
                )
                # One payment, at most one start command, and only for a paid, unflagged order
                assert paid_notices <= 1
                assert commands <= 1
                if commands:
                    assert order.paid_at is not None
                    assert order.flag is None
                # No run without payment
                if order.started_at is not None:
                    assert order.paid_at is not None
                # Never more back than was paid, and nothing back for nothing paid
                owed = owed_total(session, order.id)
                assert refunded_total(session, order.id) <= owed
                if order.paid_at is None:
                    assert owed == 0
                else:
                    assert owed <= paid_total(order)

        # --- the end: everything settles ------------------------------------------

        def _deliver(self, notify: Any) -> Any:
            headers = {"Content-Type": notify.headers["content-type"]}
            if notify.url.path.endswith("wechatpay"):
                sandbox = stack.runtime.sandbox
                assert sandbox is not None
                headers |= sandbox.wechatpay.sign_notify(notify.content)
            return self.http.post(notify.url.path, content=notify.content, headers=headers)

        def _device_says(self, name: str, message: Any) -> None:
            handle_device_message(self.ctx, ParsedTopic(self.device, "evt", name), encode(message))  # type: ignore[arg-type]

        def _settle(self) -> None:
            assert self.order is not None
            for notify in self.notifies:
                self._deliver(notify)
            for _ in range(12):
                stack.clock.advance(
                    max(self.ctx.settings.checkout_ttl_s, self.ctx.settings.start_deadline_s) + 1
                )
                sweep_unpaid(self.ctx)
                dispatch_due(self.ctx, self.publisher)
                process_due_refunds(self.ctx)
            with self.ctx.sessions() as session:
                order = session.get_one(Order, self.order["order_id"])
                refunds = list(session.scalars(select(Refund).where(Refund.order_id == order.id)))
                back = refunded_total(session, order.id)
                if not self.guest_paid:
                    assert order.status in ("expired", "awaiting_payment")
                    assert order.paid_at is None
                    return
                # Every paid order ends ran-or-refunded, automatically
                assert order.status in ("running", "completed", "partially_refunded", "refunded"), (
                    order.status
                )
                if order.status == "refunded":
                    assert back == paid_total(order)
                if order.started_at is None:
                    assert back == paid_total(order), (
                        order.status,
                        [(r.reason, r.status) for r in refunds],
                    )
                assert all(r.status in ("refunded", "cancelled") for r in refunds)

    run_state_machine_as_test(
        OneOrder,
        settings=settings(
            max_examples=15,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )

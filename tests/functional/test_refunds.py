"""Refunds through the server: staff refunds, provider errors, slow refunds, one per key."""

from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from roompay.domain.catalog import Wallet
from roompay.protocol.messages import RunAck, StartCommand
from roompay.services.auth import Role, create_user
from roompay.services.dispatch import dispatch_due
from roompay.services.refunds import process_due_refunds
from roompay.services.seed import create_hotel, ensure_operator
from roompay.store.db import transaction
from roompay.store.models import AuditEntry, Device, Order, Refund
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for


def _completed_order(stack: Stack, http: httpx.Client, wallet: str) -> dict[str, Any]:
    device = stack.device_codes[0]
    order: dict[str, Any] = http.post(
        "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": wallet}
    ).json()
    assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
    wait_for(lambda: _status(http, order["order_id"]) == "completed", 20, "completed")
    return order


def _status(http: httpx.Client, order_id: str) -> str:
    return str(http.get(f"/api/v1/orders/{order_id}").json()["status"])


def _login(stack: Stack, username: str, role: Role, hotel_id: int | None) -> dict[str, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, "pw-" + username, role, hotel_id, stack.clock.now())
    with stack.client() as http:
        token = http.post(
            "/api/v1/auth/token", data={"username": username, "password": "pw-" + username}
        ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _hotel_id(stack: Stack) -> int:
    with stack.runtime.ctx.sessions() as session:
        return session.scalars(
            select(Device.hotel_id).where(Device.code == stack.device_codes[0])
        ).one()


@pytest.mark.parametrize("wallet", ["wechat", "alipay"])
def test_front_desk_refunds_part_of_an_order_once_with_an_audit_entry(
    stack: Stack, wallet: str
) -> None:
    front_desk = _login(stack, "desk", Role.FRONT_DESK, _hotel_id(stack))
    with device_agents(stack, stack.device_codes[:1]), stack.client() as http:
        order = _completed_order(stack, http, wallet)
        url = f"/api/v1/orders/{order['order_id']}/refunds"
        body = {"amount_fen": 300, "reason": "dryer left clothes damp"}
        # When the front desk refunds 3 yuan, and the browser sends the request twice
        first = http.post(url, json=body, headers={**front_desk, "Idempotency-Key": "desk-1"})
        again = http.post(url, json=body, headers={**front_desk, "Idempotency-Key": "desk-1"})
        # Then one refund exists and reaches the guest; the order shows it
        assert first.status_code == 201, first.text
        assert again.status_code == 201
        assert first.json()["refund_key"] == again.json()["refund_key"]
        done = wait_for(
            lambda: (
                _status(http, order["order_id"]) == "partially_refunded"
                and http.get(f"/api/v1/orders/{order['order_id']}").json()
            ),
            20,
            "partially refunded",
        )
        assert done["refunded_fen"] == 300
        # And more than what is left cannot be refunded
        too_much = http.post(url, json={"amount_fen": 501, "reason": "x"}, headers=front_desk)
        assert too_much.status_code == 422
        assert too_much.json()["error"]["code"] == "refund_exceeds_paid"
        listed = http.get(url, headers=front_desk).json()
    assert [(r["amount_fen"], r["status"], r["note"]) for r in listed] == [
        (300, "refunded", "dryer left clothes damp")
    ]
    with stack.runtime.ctx.sessions() as session:
        entries = list(session.scalars(select(AuditEntry)))
    assert [(e.action, e.target, e.detail["amount_fen"], e.detail["by"]) for e in entries] == [
        ("refund", order["order_id"], 300, "desk")
    ]


def test_other_hotels_and_technicians_cannot_refund(stack: Stack) -> None:
    with transaction(stack.runtime.ctx.sessions) as session:
        other = create_hotel(session, ensure_operator(session, "op", "Op"), "other", "Other", 2)
        other_id = other.id
    stranger = _login(stack, "other-manager", Role.MANAGER, other_id)
    technician = _login(stack, "tech", Role.TECHNICIAN, _hotel_id(stack))
    with device_agents(stack, stack.device_codes[:1]), stack.client() as http:
        order = _completed_order(stack, http, "wechat")
        url = f"/api/v1/orders/{order['order_id']}/refunds"
        body = {"amount_fen": 100, "reason": "x"}
        anonymous = http.post(url, json=body)
        foreign = http.post(url, json=body, headers=stranger)
        tech = http.post(url, json=body, headers=technician)
    assert anonymous.status_code == 401
    assert (foreign.status_code, foreign.json()["error"]["code"]) == (404, "unknown_order")
    assert (tech.status_code, tech.json()["error"]["code"]) == (403, "forbidden")
    with stack.runtime.ctx.sessions() as session:
        assert list(session.scalars(select(Refund))) == []


@pytest.mark.parametrize("wallet", ["wechat", "alipay"])
def test_provider_errors_are_retried_with_the_same_key_and_refund_once(
    stack: Stack, wallet: str
) -> None:
    admin = _login(stack, "root", Role.ADMIN, None)
    provider = "wechatpay" if wallet == "wechat" else "alipay"
    operation = "refund" if wallet == "wechat" else "alipay.trade.refund"
    with device_agents(stack, stack.device_codes[:1]), stack.client() as http:
        order = _completed_order(stack, http, wallet)
        # Given a provider that fails the next two refund calls in two different ways
        for kind in ("system_error", "http_500"):
            armed = http.post(
                "/sandbox/faults", json={"provider": provider, "operation": operation, "kind": kind}
            )
            assert armed.status_code == 204
        created = http.post(
            f"/api/v1/orders/{order['order_id']}/refunds",
            json={"amount_fen": 800, "reason": "appliance broken"},
            headers=admin,
        )
        assert created.status_code == 201

        # When the refund worker retries (the clock moves past its backoff)
        def refunded() -> bool:
            stack.clock.advance(6)
            return _status(http, order["order_id"]) == "refunded"

        wait_for(refunded, 30, "refunded")
    # Then the provider paid it once, under the one key
    provider_refund = stack.runtime.ctx.provider(
        __import__("roompay.domain.catalog", fromlist=["Wallet"]).Wallet(wallet)
    )
    outcome = provider_refund.query_refund(order["order_id"], created.json()["refund_key"])
    assert outcome.amount_fen == 800
    assert outcome.state.value == "success"
    with stack.runtime.ctx.sessions() as session:
        refund = session.scalars(select(Refund)).one()
    assert (refund.status, refund.attempts) == ("refunded", 3)


def test_a_processing_refund_is_followed_until_it_succeeds_and_an_abnormal_one_is_flagged(
    stack: Stack,
) -> None:
    admin = _login(stack, "root", Role.ADMIN, None)
    with device_agents(stack, stack.device_codes[:1]), stack.client() as http:
        order = _completed_order(stack, http, "wechat")
        url = f"/api/v1/orders/{order['order_id']}/refunds"
        assert (
            http.post(
                "/sandbox/refund-mode", json={"provider": "wechatpay", "mode": "processing"}
            ).status_code
            == 204
        )
        slow = http.post(url, json={"amount_fen": 200, "reason": "late"}, headers=admin).json()

        def refund_status(key: str) -> str:
            stack.clock.advance(6)
            return str(
                next(
                    r["status"]
                    for r in http.get(url, headers=admin).json()
                    if r["refund_key"] == key
                )
            )

        wait_for(
            lambda: refund_status(slow["refund_key"]) == "refunded", 30, "processing then refunded"
        )
        assert (
            http.post(
                "/sandbox/refund-mode", json={"provider": "wechatpay", "mode": "abnormal"}
            ).status_code
            == 204
        )
        stuck = http.post(url, json={"amount_fen": 100, "reason": "again"}, headers=admin).json()
        wait_for(
            lambda: refund_status(stuck["refund_key"]) == "needs_attention", 30, "needs attention"
        )
        final = http.get(f"/api/v1/orders/{order['order_id']}").json()
    assert final["status"] == "partially_refunded"
    assert final["refunded_fen"] == 200


def test_a_provider_failure_at_checkout_is_a_clear_503_and_leaves_no_payable_order(
    stack: Stack,
) -> None:
    with device_agents(stack, stack.device_codes[:1]), stack.client() as http:
        http.post(
            "/sandbox/faults",
            json={"provider": "wechatpay", "operation": "native", "kind": "system_error"},
        )
        response = http.post(
            "/api/v1/checkout",
            json={"device": stack.device_codes[0], "program": "dry30", "wallet": "wechat"},
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "provider_unavailable"
    with stack.runtime.ctx.sessions() as session:
        orders = list(session.scalars(select(Order)))
    assert [(o.status, o.qr_content) for o in orders] == [("expired", None)]


class _Offline:
    """A device link that is down: commands wait, then miss their deadline."""

    connected = False

    def publish_start(self, code: str, command: StartCommand) -> None:
        raise AssertionError("nothing is published while the link is down")

    def publish_run_ack(self, code: str, ack: RunAck) -> None:
        raise AssertionError("nothing is published while the link is down")


def _deliver(stack: Stack, http: httpx.Client, notify: httpx.Request) -> httpx.Response:
    sandbox = stack.runtime.sandbox
    assert sandbox is not None
    headers = {"Content-Type": "application/json"} | sandbox.wechatpay.sign_notify(notify.content)
    return http.post(notify.url.path, content=notify.content, headers=headers)


def test_a_wechat_refund_result_notify_completes_a_processing_refund(quiet_stack: Stack) -> None:
    stack = quiet_stack
    ctx = stack.runtime.ctx
    held = stack.notify_wire.held
    assert held is not None
    with transaction(ctx.sessions) as session:
        session.execute(update(Device).values(online=True))
    with stack.client() as http:
        # Given a paid order whose appliance never answered: a full refund is owed
        order = http.post(
            "/api/v1/checkout",
            json={"device": stack.device_codes[0], "program": "dry30", "wallet": "wechat"},
        ).json()
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        payment: httpx.Request = wait_for(lambda: held[0] if held else None, 10, "the notify")
        assert _deliver(stack, http, payment).status_code == 204
        stack.clock.advance(stack.settings.start_deadline_s + 1)
        dispatch_due(ctx, _Offline())
        # And WeChat Pay takes its time over refunds
        mode = {"provider": "wechatpay", "mode": "processing"}
        assert http.post("/sandbox/refund-mode", json=mode).status_code == 204
        process_due_refunds(ctx)
        with ctx.sessions() as session:
            refund = session.scalars(select(Refund)).one()
        assert refund.status == "processing"
        # When the refund completes at the provider, which notifies its result
        ctx.provider(Wallet.WECHAT).query_refund(order["order_id"], refund.refund_key)
        notice: httpx.Request = wait_for(
            lambda: next((r for r in held if r.url.path.endswith("/refund")), None), 10, "notify"
        )
        # Then the notify alone completes our refund and the order, and a repeat changes nothing
        assert _deliver(stack, http, notice).status_code == 204
        assert _deliver(stack, http, notice).status_code == 204
        final = http.get(f"/api/v1/orders/{order['order_id']}").json()
    with ctx.sessions() as session:
        refund = session.scalars(select(Refund)).one()
    assert (refund.status, refund.amount_fen) == ("refunded", 800)
    assert (final["status"], final["refunded_fen"]) == ("refunded", 800)

"""Every paid order ends ran-or-refunded: expiry, lost and late notifies, mismatches, deadlines."""

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from roompay.domain.catalog import Wallet
from roompay.payments.base import QrOrderRequest, TradeState
from roompay.store.models import Command, Order, PaymentNotice, Refund
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for

WALLETS = ["wechat", "alipay"]


def _checkout(
    http: httpx.Client, device: str, wallet: str, program: str = "dry30"
) -> dict[str, Any]:
    response = http.post(
        "/api/v1/checkout", json={"device": device, "program": program, "wallet": wallet}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _order(http: httpx.Client, order_id: str) -> dict[str, Any]:
    body: dict[str, Any] = http.get(f"/api/v1/orders/{order_id}").json()
    return body


def _status_is(http: httpx.Client, order_id: str, status: str) -> dict[str, Any] | None:
    body = _order(http, order_id)
    return body if body["status"] == status else None


def _count(stack: Stack, model: type, **where: object) -> int:
    with stack.runtime.ctx.sessions() as session:
        query = select(func.count()).select_from(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        return int(session.scalar(query) or 0)


@pytest.mark.parametrize("wallet", WALLETS)
def test_an_unpaid_checkout_expires_and_is_closed_at_the_provider(
    stack: Stack, wallet: str
) -> None:
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, wallet)
        # When the checkout's lifetime passes without payment
        stack.clock.advance(stack.settings.checkout_ttl_s + 1)
        wait_for(lambda: _status_is(http, order["order_id"], "expired"), 20, "expired")
        # Then the provider has closed it (or, for an unscanned Alipay QR, never knew it)
        provider = stack.runtime.ctx.provider(Wallet(wallet))
        state = provider.query_trade(order["order_id"]).state
        assert state is (TradeState.CLOSED if wallet == "wechat" else TradeState.NOT_FOUND)
    with stack.runtime.ctx.sessions() as session:
        stored = session.get_one(Order, order["order_id"])
        assert stored.closed_at_provider is True
    assert _count(stack, Command) == 0


def test_a_wechat_payment_after_close_is_impossible(stack: Stack) -> None:
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, "wechat")
        stack.clock.advance(stack.settings.checkout_ttl_s + 1)
        wait_for(lambda: _status_is(http, order["order_id"], "expired"), 20, "expired")
        late = http.post("/sandbox/pay", json={"qr": order["qr"]})
    assert late.status_code == 409
    assert _count(stack, PaymentNotice) == 0


@pytest.mark.parametrize("policy", ["refund", "honour_if_free"])
def test_an_alipay_payment_after_expiry_is_refunded_or_honoured(stack: Stack, policy: str) -> None:
    # Alipay cannot close a QR nobody scanned, so a guest can still pay after expiry.
    stack.settings.late_payment_policy = policy  # type: ignore[assignment]
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, "alipay")
        stack.clock.advance(stack.settings.checkout_ttl_s + 1)
        wait_for(lambda: _status_is(http, order["order_id"], "expired"), 20, "expired")
        # When the guest scans and pays the expired QR anyway
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        if policy == "refund":
            # Then the money goes back in full and the appliance never runs
            done = wait_for(lambda: _status_is(http, order["order_id"], "refunded"), 20, "refunded")
            assert done["refunded_fen"] == order["amount_fen"]
            assert _count(stack, Command) == 0
        else:
            # Then the appliance, free and online, runs it
            wait_for(lambda: _status_is(http, order["order_id"], "completed"), 20, "completed")
            assert _count(stack, Refund) == 0


@pytest.mark.parametrize("wallet", WALLETS)
def test_a_lost_notify_is_found_by_the_active_query(stack: Stack, wallet: str) -> None:
    def drop(request: httpx.Request) -> httpx.Request:
        raise httpx.ConnectError("notify lost on the way", request=request)

    stack.notify_wire.tamper = drop
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, wallet)
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        # The query runs query_after_s after creation; move time past it
        stack.clock.advance(stack.settings.query_after_s + 1)
        wait_for(lambda: _status_is(http, order["order_id"], "completed"), 20, "completed")
    with stack.runtime.ctx.sessions() as session:
        notices = list(session.scalars(select(PaymentNotice)))
    assert [(n.outcome, n.notification_id.split(":")[0]) for n in notices] == [("paid", "query")]


@pytest.mark.parametrize("wallet", WALLETS)
def test_a_signed_notify_for_another_amount_is_flagged_refunded_and_never_runs(
    stack: Stack, wallet: str
) -> None:
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, wallet)
        paid = http.post("/sandbox/pay", json={"qr": order["qr"], "notify_amount_fen": 799})
        assert paid.status_code == 200
        done = wait_for(lambda: _status_is(http, order["order_id"], "refunded"), 20, "refunded")
    assert done["refunded_fen"] == 799
    assert done["started_at"] is None
    assert _count(stack, Command) == 0
    with stack.runtime.ctx.sessions() as session:
        stored = session.get_one(Order, order["order_id"])
        assert stored.flag == "amount_mismatch"
        assert stored.paid_amount_fen == 799


def test_a_start_that_misses_its_deadline_is_refunded_in_full(stack: Stack) -> None:
    device = stack.device_codes[0]
    with device_agents(stack, [device]) as agents, stack.client() as http:
        order = _checkout(http, device, "wechat")
        # Given an appliance that went away between checkout and payment
        agents[0].stop()
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        wait_for(lambda: _status_is(http, order["order_id"], "paid"), 20, "paid")
        # When the start deadline passes without an answer
        stack.clock.advance(stack.settings.start_deadline_s + 1)
        done = wait_for(lambda: _status_is(http, order["order_id"], "refunded"), 20, "refunded")
    assert done["refunded_fen"] == 800
    with stack.runtime.ctx.sessions() as session:
        command = session.scalars(select(Command)).one()
        refund = session.scalars(select(Refund)).one()
    assert command.status == "expired"
    assert (refund.reason, refund.status, refund.amount_fen) == (
        "start_deadline_passed",
        "refunded",
        800,
    )


def _capture_first_notify(stack: Stack) -> list[httpx.Request]:
    captured: list[httpx.Request] = []

    def keep(request: httpx.Request) -> httpx.Request:
        captured.append(request)
        return request

    stack.notify_wire.tamper = keep
    return captured


@pytest.mark.parametrize("wallet", WALLETS)
def test_fifty_concurrent_copies_of_one_notify_have_the_effect_of_one(
    stack: Stack, wallet: str
) -> None:
    device = stack.device_codes[0]
    captured = _capture_first_notify(stack)
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, wallet)
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        wait_for(lambda: captured, 10, "the genuine notify")
        original = captured[0]
        headers = {
            k: v
            for k, v in original.headers.items()
            if k.lower() == "content-type" or k.lower().startswith("wechatpay")
        }

        def replay(_: int) -> int:
            return http.post(
                original.url.path, content=original.content, headers=headers
            ).status_code

        # When 50 copies of the same signed notify arrive at once
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(replay, range(50)))
        wait_for(lambda: _status_is(http, order["order_id"], "completed"), 20, "completed")
    # Then every copy is acknowledged, and the order was paid and started exactly once
    assert set(statuses) == {204 if wallet == "wechat" else 200}
    assert _count(stack, PaymentNotice, outcome="paid") == 1
    assert _count(stack, Command) == 1
    with stack.runtime.ctx.sessions() as session:
        assert list(session.scalars(select(Order.status))) == ["completed"]


@pytest.mark.parametrize("wallet", WALLETS)
def test_a_notify_for_an_unknown_order_is_acknowledged_and_kept_as_orphan(
    stack: Stack, wallet: str
) -> None:
    # Given a trade at the provider that roompay never created (another system's, or lost)
    provider = stack.runtime.ctx.provider(Wallet(wallet))
    stranger = "0" * 24 + "deadbeef"
    qr = provider.create_qr_order(
        QrOrderRequest(
            stranger,
            "unknown",
            500,
            stack.clock.now() + timedelta(minutes=5),
            f"{stack.base_url}/api/v1/notify/{'wechatpay' if wallet == 'wechat' else 'alipay'}",
        )
    ).qr_content
    with stack.client() as http:
        assert http.post("/sandbox/pay", json={"qr": qr}).status_code == 200
    records = stack.runtime.sandbox.notifier.records  # type: ignore[union-attr]
    wait_for(lambda: records and records[-1].delivered, 10, "acknowledged")
    assert _count(stack, PaymentNotice, outcome="orphan", out_trade_no=stranger) == 1
    assert _count(stack, Order) == 0


def test_an_alipay_trade_exists_only_once_the_guest_scans(stack: Stack) -> None:
    device = stack.device_codes[0]
    provider = stack.runtime.ctx.provider(Wallet.ALIPAY)
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, "alipay")
        before = provider.query_trade(order["order_id"]).state
        scanned = http.post("/sandbox/scan", json={"qr": order["qr"]})
        after = provider.query_trade(order["order_id"]).state
        unknown = http.post("/sandbox/scan", json={"qr": "https://qr.alipay.com/nothing"})
    assert (before, after) == (TradeState.NOT_FOUND, TradeState.NOT_PAID)
    assert scanned.json() == {"provider": "alipay", "state": "WAIT_BUYER_PAY"}
    assert unknown.status_code == 404

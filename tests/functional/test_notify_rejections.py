"""Forged or mismatched payment notifications are refused and change nothing."""

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

from roompay.payments import crypto
from roompay.payments.alipay import AlipayConfig, AlipayProvider
from roompay.payments.base import QrOrderRequest
from roompay.sandbox.notifier import DeliveryRecord
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for

Tamper = Callable[[httpx.Request], httpx.Request]


def _rebuilt(
    request: httpx.Request, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Request:
    merged = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    merged.update(headers or {})
    return httpx.Request(request.method, request.url, content=body, headers=merged)


def wechat_bad_signature(request: httpx.Request) -> httpx.Request:
    """Replace the platform signature with one made by nobody."""
    forged = base64.b64encode(b"\x01" * 256).decode()
    return _rebuilt(request, request.content, {"Wechatpay-Signature": forged})


def wechat_altered_body(request: httpx.Request) -> httpx.Request:
    """Change the notify id after signing: the signature no longer covers the body."""
    envelope = json.loads(request.content)
    envelope["id"] = "EV-forged"
    return _rebuilt(request, json.dumps(envelope).encode())


def alipay_altered_amount(request: httpx.Request) -> httpx.Request:
    """Raise the amount after signing."""
    fields = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
    fields["total_amount"] = "0.01"
    return _rebuilt(request, urlencode(fields).encode())


def alipay_unsigned(request: httpx.Request) -> httpx.Request:
    """Drop the signature."""
    fields = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
    del fields["sign"]
    return _rebuilt(request, urlencode(fields).encode())


def first_attempt_only(tamper: Tamper) -> Tamper:
    """Tamper with the first delivery only; the provider's retries go through untouched."""
    seen = 0

    def once(request: httpx.Request) -> httpx.Request:
        nonlocal seen
        seen += 1
        return tamper(request) if seen == 1 else request

    return once


def _order_status(http: httpx.Client, order_id: str) -> str:
    return str(http.get(f"/api/v1/orders/{order_id}").json()["status"])


def _checkout(http: httpx.Client, device: str, wallet: str) -> dict[str, Any]:
    response = http.post(
        "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": wallet}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(
    ("wallet", "tamper"),
    [
        ("wechat", wechat_bad_signature),
        ("wechat", wechat_altered_body),
        ("alipay", alipay_altered_amount),
        ("alipay", alipay_unsigned),
    ],
)
def test_a_forged_notify_is_refused_and_the_genuine_retry_pays(
    stack: Stack, wallet: str, tamper: Tamper
) -> None:
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order = _checkout(http, device, wallet)
        before = stack.table_counts()
        # Given a forger who alters the provider's first notification on the wire
        stack.notify_wire.tamper = first_attempt_only(tamper)
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        records = stack.runtime.sandbox.notifier.records  # type: ignore[union-attr]
        # Then the forged delivery is refused with a 4xx and changes nothing
        first = wait_for(
            lambda: records and records[-1].attempts >= 1 and records[-1], 10, "delivery"
        )
        wait_for(lambda: first.last_status is not None, 10, "first answer")
        assert first.attempts >= 1
        # And the provider's genuine retry is accepted and pays the order exactly once
        wait_for(lambda: first.delivered, 20, "genuine retry delivered")
        assert first.attempts == 2
        wait_for(lambda: _order_status(http, order["order_id"]) == "completed", 20, "completed")
    after = stack.table_counts()
    assert after["payment_notices"] == before["payment_notices"] + 1
    assert after["commands"] == before["commands"] + 1


def test_an_alipay_notify_for_another_app_is_refused_and_changes_nothing(
    stack: Stack,
) -> None:
    # Given another merchant app at the same provider, whose order names our notify URL
    key = crypto.generate_private_key()
    sandbox = stack.runtime.sandbox
    assert sandbox is not None
    other = sandbox.alipay.register_merchant(crypto.public_key_pem(key))
    config = AlipayConfig(
        app_id=other["app_id"],
        seller_id=other["seller_id"],
        app_private_key_pem=crypto.private_key_pem(key),
        alipay_public_key_pem=other["public_key_pem"],
        gateway_url=stack.settings.alipay_gateway_url,
    )
    stranger = AlipayProvider(config, stack.clock)
    try:
        qr = stranger.create_qr_order(
            QrOrderRequest(
                "f" * 32,
                "other app",
                800,
                stack.clock.now() + timedelta(minutes=5),
                f"{stack.base_url}/api/v1/notify/alipay",
            )
        ).qr_content
    finally:
        stranger.close()
    before = stack.table_counts()
    with stack.client() as http:
        assert http.post("/sandbox/pay", json={"qr": qr}).status_code == 200
    record = wait_for(
        lambda: (
            sandbox.notifier.records
            and sandbox.notifier.records[-1].attempts >= 2
            and sandbox.notifier.records[-1]
        ),
        20,
        "retries",
    )
    # Then Alipay is told `fail` every time and nothing is written, not even an orphan
    assert isinstance(record, DeliveryRecord)
    assert not record.delivered
    assert stack.table_counts() == before

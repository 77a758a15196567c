"""The Alipay client and adapter against the Alipay emulator, mounted in a real FastAPI app."""

import asyncio
import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from starlette.exceptions import StarletteDeprecationWarning

from roompay.payments.alipay import AlipayConfig, AlipayProvider
from roompay.payments.alipay.client import beijing_timestamp as beijing
from roompay.payments.alipay.client import extract_signed_response, request_sign_content
from roompay.payments.base import (
    BillEntry,
    BillEntryKind,
    QrOrderRequest,
    RefundOutcome,
    RefundRequest,
    RefundState,
    TradeSnapshot,
    TradeState,
)
from roompay.payments.crypto import (
    generate_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    sign_b64,
    verify_b64,
)
from roompay.payments.errors import (
    ProviderRejectedError,
    ProviderSignatureError,
    ProviderUnavailableError,
    TradeAlreadyPaidError,
)
from roompay.sandbox.alipay import AlipayEmulator
from roompay.sandbox.faults import FaultKind, Faults, RefundMode
from roompay.sandbox.notifier import DeliveryRecord, Notifier
from tests.support.live import live_server

with warnings.catch_warnings():
    # Starlette 1.x prefers its httpx fork; with httpx installed its TestClient still
    # subclasses httpx.Client, which is exactly what the Alipay client accepts.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

START = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
GATEWAY = "http://testserver/sandbox/alipay/gateway.do"
NOTIFY_URL = "http://roompay.test/notify/alipay"
SUBJECT = "干衣机 30 分钟"


@dataclass
class Clock:
    at: datetime = START

    def now(self) -> datetime:
        return self.at


@dataclass
class Receiver:
    """The merchant's notify endpoint: records each delivery and answers from a script."""

    replies: list[str] = field(default_factory=list)
    received: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        reply = self.replies.pop(0) if self.replies else "success"
        return httpx.Response(200, text=reply)


@dataclass
class Sandbox:
    clock: Clock
    receiver: Receiver
    notifier: Notifier
    emulator: AlipayEmulator
    faults: Faults
    http: TestClient
    config: AlipayConfig
    provider: AlipayProvider


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return generate_private_key()


def register(http: TestClient, app_key: rsa.RSAPrivateKey) -> AlipayConfig:
    response = http.post(
        "/sandbox/alipay/merchants", json={"public_key_pem": public_key_pem(app_key)}
    )
    assert response.status_code == 201
    created = response.json()
    return AlipayConfig(
        app_id=created["app_id"],
        seller_id=created["seller_id"],
        app_private_key_pem=private_key_pem(app_key),
        alipay_public_key_pem=created["public_key_pem"],
        gateway_url=GATEWAY,
    )


def mount(emulator: AlipayEmulator) -> FastAPI:
    app = FastAPI()
    app.include_router(emulator.router(), prefix="/sandbox/alipay")
    return app


@pytest.fixture
def sandbox(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> Iterator[Sandbox]:
    clock = Clock()
    receiver = Receiver()
    # A million-fold speed-up replays Alipay's 25-hour schedule in about 0.1 s.
    notifier = Notifier(time_scale=1_000_000, transport=httpx.MockTransport(receiver))
    faults = Faults(slow_s=0.5, processing_queries=2)
    emulator = AlipayEmulator(tmp_path, clock, notifier, faults)
    with TestClient(mount(emulator)) as http:
        config = register(http, app_key)
        provider = AlipayProvider(config, clock, http)
        yield Sandbox(clock, receiver, notifier, emulator, faults, http, config, provider)
    asyncio.run(notifier.aclose())


def order(out_trade_no: str = "order-0001", amount_fen: int = 800) -> QrOrderRequest:
    return QrOrderRequest(
        out_trade_no=out_trade_no,
        description=SUBJECT,
        amount_fen=amount_fen,
        expires_at=START + timedelta(minutes=5),
        notify_url=NOTIFY_URL,
    )


def gateway_body(sandbox: Sandbox, response: httpx.Response, method: str) -> dict[str, object]:
    """Check the emulator's sign on a raw gateway answer and return the inner object."""
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json;charset=utf-8"
    signed = extract_signed_response(response.text, method)
    alipay_key = load_public_key(sandbox.config.alipay_public_key_pem)
    assert signed.sign is not None
    assert verify_b64(alipay_key, signed.body_text.encode(), signed.sign)
    return signed.body


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.001)


def pay(sandbox: Sandbox, qr: str) -> tuple[dict[str, str], DeliveryRecord]:
    async def scenario() -> tuple[dict[str, str], DeliveryRecord]:
        paid = await sandbox.emulator.guest_pay(qr)
        record = sandbox.notifier.records[-1]
        await until(lambda: record.delivered)
        return paid, record

    return asyncio.run(scenario())


# --- merchants -----------------------------------------------------------------------


def test_registration_returns_ids_and_survives_a_restart(sandbox: Sandbox, tmp_path: Path) -> None:
    assert len(sandbox.config.app_id) == 16
    assert sandbox.config.app_id.startswith("2021")
    assert sandbox.config.app_id.isdigit()
    assert len(sandbox.config.seller_id) == 16
    assert sandbox.config.seller_id.startswith("2088")
    assert sandbox.config.seller_id.isdigit()

    restarted = AlipayEmulator(tmp_path, sandbox.clock, sandbox.notifier)
    with TestClient(mount(restarted)) as http:
        provider = AlipayProvider(sandbox.config, sandbox.clock, http)
        qr = provider.create_qr_order(order()).qr_content

    assert restarted.alipay_public_key_pem == sandbox.config.alipay_public_key_pem
    assert restarted.owns_qr(qr)
    assert (tmp_path / "alipay.json").stat().st_mode & 0o777 == 0o600


def test_registration_with_an_invalid_pem_is_a_400(sandbox: Sandbox) -> None:
    response = sandbox.http.post("/sandbox/alipay/merchants", json={"public_key_pem": "nope"})

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_public_key"
    assert "not an RSA public key" in response.json()["message"]


# --- precreate --------------------------------------------------------------------------


def test_precreate_returns_a_qr_the_emulator_owns(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content

    assert qr.startswith("https://qr.alipay.com/bax0")
    assert sandbox.emulator.owns_qr(qr)
    assert not sandbox.emulator.owns_qr("https://qr.alipay.com/bax0unknown")


def test_repeated_precreate_is_idempotent_but_not_with_another_amount(sandbox: Sandbox) -> None:
    first = sandbox.provider.create_qr_order(order())
    sandbox.clock.at += timedelta(minutes=1)  # a retry computes a shorter timeout_express

    again = sandbox.provider.create_qr_order(order())
    with pytest.raises(ProviderRejectedError) as caught:
        sandbox.provider.create_qr_order(order(amount_fen=1))

    assert again == first
    assert caught.value.code == "ACQ.CONTEXT_INCONSISTENT"


def test_precreate_with_an_invalid_amount_is_rejected(sandbox: Sandbox) -> None:
    biz = {"out_trade_no": "o-1", "total_amount": "0.00", "subject": "x"}

    with pytest.raises(ProviderRejectedError) as caught:
        sandbox.provider.client.execute("alipay.trade.precreate", biz)

    assert caught.value.code == "ACQ.INVALID_PARAMETER"
    assert "outside [0.01, 100000000]" in caught.value.message


def test_gateway_accepts_get_and_post_forms(sandbox: Sandbox) -> None:
    biz = {"out_trade_no": "o-get", "total_amount": "3.05", "subject": SUBJECT}
    params = sandbox.provider.client.signed_params("alipay.trade.precreate", biz, NOTIFY_URL)
    query = {k: v for k, v in params.items() if k != "biz_content"}

    by_get = sandbox.http.get(GATEWAY, params=params)
    by_post = sandbox.http.post(GATEWAY, params=query, data={"biz_content": params["biz_content"]})

    get_body = gateway_body(sandbox, by_get, "alipay.trade.precreate")
    post_body = gateway_body(sandbox, by_post, "alipay.trade.precreate")
    assert get_body["code"] == "10000"
    assert get_body["out_trade_no"] == "o-get"
    assert post_body == get_body  # the same trade again


def test_gateway_verifies_ascii_escaped_biz_content_as_received(
    sandbox: Sandbox, app_key: rsa.RSAPrivateKey
) -> None:
    # Some SDKs escape non-ASCII and send total_amount as a JSON number.
    params = {
        "app_id": sandbox.config.app_id,
        "method": "alipay.trade.precreate",
        "charset": "utf-8",
        "sign_type": "RSA2",
        "timestamp": "2026-03-01 20:30:00",
        "version": "1.0",
        "biz_content": '{"out_trade_no":"o-n","total_amount":3.05,"subject":"\\u5e72"}',
    }
    params["sign"] = sign_b64(app_key, request_sign_content(params).encode())

    response = sandbox.http.get(GATEWAY, params=params)

    body = gateway_body(sandbox, response, "alipay.trade.precreate")
    assert (body["code"], body["out_trade_no"]) == ("10000", "o-n")


def test_tampered_request_is_rejected_with_a_signed_error(sandbox: Sandbox) -> None:
    biz = {"out_trade_no": "o-t", "total_amount": "3.05", "subject": "x"}
    params = sandbox.provider.client.signed_params("alipay.trade.precreate", biz)
    params["biz_content"] = params["biz_content"].replace("3.05", "0.01")

    response = sandbox.http.get(GATEWAY, params=params)

    body = gateway_body(sandbox, response, "alipay.trade.precreate")
    assert response.text.startswith('{"error_response":{')
    assert (body["code"], body["msg"], body["sub_code"]) == (
        "40002",
        "Invalid Arguments",
        "isv.invalid-signature",
    )
    honest = sandbox.provider.client.execute("alipay.trade.precreate", biz)
    assert honest["out_trade_no"] == "o-t"  # no trade at 0.01 was created by the forgery


def test_request_signed_with_another_key_is_rejected_by_the_gateway(sandbox: Sandbox) -> None:
    stranger = AlipayConfig(
        app_id=sandbox.config.app_id,
        seller_id=sandbox.config.seller_id,
        app_private_key_pem=private_key_pem(generate_private_key()),
        alipay_public_key_pem=sandbox.config.alipay_public_key_pem,
        gateway_url=GATEWAY,
    )
    provider = AlipayProvider(stranger, sandbox.clock, sandbox.http)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(order())

    assert caught.value.code == "isv.invalid-signature"


def test_unknown_app_and_skewed_clock_are_rejected(sandbox: Sandbox) -> None:
    unknown = dataclasses.replace(sandbox.config, app_id="2021000000000000")
    skewed = Clock(START + timedelta(minutes=16))
    tolerated = Clock(START - timedelta(minutes=14))

    with pytest.raises(ProviderRejectedError) as bad_app:
        AlipayProvider(unknown, sandbox.clock, sandbox.http).create_qr_order(order())
    with pytest.raises(ProviderRejectedError) as bad_time:
        AlipayProvider(sandbox.config, skewed, sandbox.http).client.query_order("x")
    with pytest.raises(ProviderRejectedError) as tolerated_time:
        AlipayProvider(sandbox.config, tolerated, sandbox.http).client.query_order("x")

    assert bad_app.value.code == "isv.invalid-app-id"
    assert bad_time.value.code == "isv.invalid-timestamp"
    assert tolerated_time.value.code == "ACQ.TRADE_NOT_EXIST"


def test_missing_sign_and_unknown_method_are_named(sandbox: Sandbox) -> None:
    params = sandbox.provider.client.signed_params("alipay.trade.query", {"out_trade_no": "x"})
    del params["sign"]

    missing = gateway_body(sandbox, sandbox.http.get(GATEWAY, params=params), "alipay.trade.query")
    with pytest.raises(ProviderRejectedError) as unknown:
        sandbox.provider.client.execute("alipay.trade.pay", {"out_trade_no": "x"})

    assert (missing["code"], missing["sub_code"]) == ("40001", "isv.missing-signature")
    assert unknown.value.code == "isv.invalid-method"
    assert "alipay.trade.pay" in unknown.value.message


def test_tampered_response_is_refused_by_the_client(sandbox: Sandbox) -> None:
    def forward_and_tamper(request: httpx.Request) -> httpx.Response:
        answer = sandbox.http.request(
            request.method,
            str(request.url),
            content=request.content,
            headers={"Content-Type": request.headers["Content-Type"]},
        )
        forged = answer.text.replace("https://qr.alipay.com/bax0", "https://evil.example/bax0")
        return httpx.Response(answer.status_code, text=forged)

    http = httpx.Client(transport=httpx.MockTransport(forward_and_tamper))
    provider = AlipayProvider(sandbox.config, sandbox.clock, http)

    with pytest.raises(ProviderSignatureError, match="does not verify"):
        provider.create_qr_order(order())


# --- the trade's life ---------------------------------------------------------------------


def test_precreated_trade_does_not_exist_until_scanned(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content

    with pytest.raises(ProviderRejectedError) as caught:
        sandbox.provider.client.query_order("order-0001")
    before_scan = sandbox.provider.query_trade("order-0001")
    sandbox.provider.close_trade("order-0001")  # nothing to close: not an error
    sandbox.emulator.scan(qr)
    scanned = sandbox.provider.client.query_order("order-0001")

    assert (caught.value.code, caught.value.message) == ("ACQ.TRADE_NOT_EXIST", "交易不存在")
    assert before_scan == TradeSnapshot("order-0001", TradeState.NOT_FOUND, None, None, None)
    assert scanned.trade_status == "WAIT_BUYER_PAY"
    assert scanned.total_amount_fen == 800
    assert len(scanned.trade_no) == 28
    assert scanned.trade_no.startswith("20260301")


def test_closing_a_scanned_trade_stops_payment(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content
    sandbox.emulator.scan(qr)

    sandbox.provider.close_trade("order-0001")
    sandbox.provider.close_trade("order-0001")  # closing again is not an error

    assert sandbox.provider.query_trade("order-0001").state is TradeState.CLOSED
    with pytest.raises(ValueError, match="closed by the merchant"):
        asyncio.run(sandbox.emulator.guest_pay(qr))
    assert sandbox.notifier.records == []


def test_scanned_trade_times_out_after_timeout_express(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content  # timeout_express 5m
    sandbox.emulator.scan(qr)
    sandbox.clock.at += timedelta(minutes=4, seconds=59)
    still_open = sandbox.provider.query_trade("order-0001").state
    sandbox.clock.at += timedelta(seconds=1)

    assert still_open is TradeState.NOT_PAID
    assert sandbox.provider.query_trade("order-0001").state is TradeState.CLOSED
    with pytest.raises(ValueError, match="timed out"):
        asyncio.run(sandbox.emulator.guest_pay(qr))


def test_guest_pay_notifies_and_the_adapter_accepts_it(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order(amount_fen=305)).qr_content
    sandbox.clock.at += timedelta(seconds=30)

    paid, record = pay(sandbox, qr)

    assert paid == {
        "provider": "alipay",
        "out_trade_no": "order-0001",
        "trade_no": paid["trade_no"],
    }
    assert (record.attempts, record.delivered) == (1, True)
    (request,) = sandbox.receiver.received
    assert str(request.url) == NOTIFY_URL
    assert request.headers["content-type"] == "application/x-www-form-urlencoded; charset=utf-8"
    fields = dict(parse_qsl(request.content.decode()))
    assert fields["subject"] == SUBJECT
    assert json.loads(fields["fund_bill_list"]) == [
        {"amount": "3.05", "fundChannel": "ALIPAYACCOUNT"}
    ]
    notification = sandbox.provider.parse_notification(
        dict(request.headers), request.content, sandbox.clock.now()
    )
    assert notification.out_trade_no == "order-0001"
    assert notification.provider_trade_no == paid["trade_no"]
    assert notification.state is TradeState.SUCCESS
    assert notification.amount_fen == 305
    assert notification.paid_at == START + timedelta(seconds=30)
    assert notification.merchant_ok is True
    assert sandbox.provider.query_trade("order-0001").state is TradeState.SUCCESS


def test_a_paid_trade_cannot_be_closed_or_paid_again(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content
    pay(sandbox, qr)

    with pytest.raises(TradeAlreadyPaidError) as close:
        sandbox.provider.close_trade("order-0001")
    with pytest.raises(ProviderRejectedError) as again:
        sandbox.provider.create_qr_order(order())
    with pytest.raises(ValueError, match="already paid"):
        asyncio.run(sandbox.emulator.guest_pay(qr))

    assert close.value.code == "ACQ.TRADE_STATUS_ERROR"
    assert again.value.code == "ACQ.TRADE_HAS_SUCCESS"


def test_unknown_qr_cannot_be_paid(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="unknown Alipay QR code"):
        asyncio.run(sandbox.emulator.guest_pay("https://qr.alipay.com/bax0nothing"))


def test_notify_is_resent_until_the_reply_is_exactly_success(sandbox: Sandbox) -> None:
    sandbox.receiver.replies = ["fail", "success\n"]
    qr = sandbox.provider.create_qr_order(order()).qr_content

    _, record = pay(sandbox, qr)

    assert (record.attempts, record.delivered) == (3, True)
    bodies = {request.content for request in sandbox.receiver.received}
    assert len(bodies) == 1  # every resend is the same signed notify


def test_notify_gives_up_after_alipays_eight_deliveries(sandbox: Sandbox) -> None:
    sandbox.receiver.replies = ["fail"] * 20
    qr = sandbox.provider.create_qr_order(order()).qr_content

    async def scenario() -> DeliveryRecord:
        await sandbox.emulator.guest_pay(qr)
        record = sandbox.notifier.records[-1]
        await until(lambda: len(sandbox.receiver.received) == 8)
        # Leave time for a ninth delivery, which must not come: the longest scaled
        # delay is 15 h / 1,000,000 = 0.054 s.
        await asyncio.sleep(0.1)
        return record

    record = asyncio.run(scenario())

    assert (record.attempts, record.delivered) == (8, False)


# --- query and close through the provider ----------------------------------------------------


def test_query_trade_before_scan_after_scan_and_after_pay(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content

    before_scan = sandbox.provider.query_trade("order-0001")
    sandbox.clock.at += timedelta(seconds=10)
    sandbox.emulator.scan(qr)
    scanned = sandbox.provider.query_trade("order-0001")
    sandbox.clock.at += timedelta(seconds=20)
    paid, _ = pay(sandbox, qr)
    after_pay = sandbox.provider.query_trade("order-0001")

    assert before_scan == TradeSnapshot("order-0001", TradeState.NOT_FOUND, None, None, None)
    assert scanned == TradeSnapshot("order-0001", TradeState.NOT_PAID, 800, paid["trade_no"], None)
    assert after_pay == TradeSnapshot(
        "order-0001", TradeState.SUCCESS, 800, paid["trade_no"], START + timedelta(seconds=30)
    )


def test_closing_is_idempotent_until_paid_and_refused_after(sandbox: Sandbox) -> None:
    qr_closed = sandbox.provider.create_qr_order(order("order-0001")).qr_content
    qr_paid = sandbox.provider.create_qr_order(order("order-0002")).qr_content
    sandbox.emulator.scan(qr_closed)
    pay(sandbox, qr_paid)

    for _ in range(2):
        sandbox.provider.close_trade("order-0001")
    with pytest.raises(TradeAlreadyPaidError):
        sandbox.provider.close_trade("order-0002")

    assert sandbox.provider.query_trade("order-0001").state is TradeState.CLOSED
    assert sandbox.provider.query_trade("order-0002").state is TradeState.SUCCESS


# --- refunds ------------------------------------------------------------------------------


def paid_trade(sandbox: Sandbox, out_trade_no: str = "order-0001", amount_fen: int = 800) -> str:
    qr = sandbox.provider.create_qr_order(order(out_trade_no, amount_fen)).qr_content
    sandbox.clock.at += timedelta(seconds=30)
    paid, _ = pay(sandbox, qr)
    return paid["trade_no"]


def refund(amount_fen: int, key: str = "r-0001", total_fen: int = 800) -> RefundRequest:
    return RefundRequest("order-0001", key, amount_fen, total_fen, "machine did not start")


def test_full_refund_succeeds_at_once_and_closes_the_trade(sandbox: Sandbox) -> None:
    trade_no = paid_trade(sandbox)
    sandbox.clock.at += timedelta(minutes=1)

    outcome = sandbox.provider.refund(refund(800))

    assert outcome == RefundOutcome("r-0001", RefundState.SUCCESS, 800, None)
    assert sandbox.provider.query_trade("order-0001") == TradeSnapshot(
        "order-0001", TradeState.CLOSED, 800, trade_no, START + timedelta(seconds=30)
    )
    assert sandbox.provider.query_refund("order-0001", "r-0001") == outcome
    with pytest.raises(TradeAlreadyPaidError):
        sandbox.provider.close_trade("order-0001")


def test_partial_refund_keeps_the_trade_paid(sandbox: Sandbox) -> None:
    paid_trade(sandbox)

    outcome = sandbox.provider.refund(refund(300))

    assert outcome == RefundOutcome("r-0001", RefundState.SUCCESS, 300, None)
    assert sandbox.provider.query_trade("order-0001").state is TradeState.SUCCESS
    assert sandbox.provider.query_refund("order-0001", "r-0001") == outcome
    assert sandbox.provider.query_refund("order-0001", "r-0002") == RefundOutcome(
        "r-0002", RefundState.NOT_FOUND, 0, None
    )


def test_the_same_key_twice_refunds_once(sandbox: Sandbox) -> None:
    trade_no = paid_trade(sandbox)
    sandbox.clock.at += timedelta(minutes=1)
    refunded_at = sandbox.clock.now()

    biz = {"out_trade_no": "order-0001", "out_request_no": "r-0001", "refund_amount": "3.00"}
    first = sandbox.provider.client.execute("alipay.trade.refund", biz)
    sandbox.clock.at += timedelta(minutes=1)
    again = sandbox.provider.client.execute("alipay.trade.refund", biz)
    again_outcome = sandbox.provider.refund(refund(300))
    rest = sandbox.provider.client.refund("order-0001", "r-0002", 500)

    assert first == {
        "code": "10000",
        "msg": "Success",
        "trade_no": trade_no,
        "out_trade_no": "order-0001",
        "buyer_logon_id": "gue***@example.com",
        "buyer_user_id": first["buyer_user_id"],
        "fund_change": "Y",
        "refund_fee": "3.00",  # cumulative
        "gmt_refund_pay": beijing(refunded_at),
        "send_back_fee": "3.00",
    }
    assert again == first | {"fund_change": "N"}
    assert again_outcome == RefundOutcome("r-0001", RefundState.SUCCESS, 300, None)
    # Had the repeat refunded again, 5.00 more would exceed the 8.00 paid.
    assert (rest.fund_change, rest.refund_fee) == ("Y", "8.00")
    assert sandbox.provider.query_trade("order-0001").state is TradeState.CLOSED


def test_over_refund_and_a_discordant_repeat_are_refused_and_change_nothing(
    sandbox: Sandbox,
) -> None:
    paid_trade(sandbox)
    sandbox.provider.refund(refund(500))

    with pytest.raises(ProviderRejectedError) as over:
        sandbox.provider.refund(refund(400, key="r-0002"))
    with pytest.raises(ProviderRejectedError) as discordant:
        sandbox.provider.refund(refund(200))
    rest = sandbox.provider.client.refund("order-0001", "r-0003", 300)

    assert over.value.code == "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"
    assert discordant.value.code == "ACQ.DISCORDANT_REPEAT_REQUEST"
    assert sandbox.provider.query_refund("order-0001", "r-0002").state is RefundState.NOT_FOUND
    assert (rest.fund_change, rest.refund_fee) == ("Y", "8.00")


def test_refunds_of_unpaid_or_unscanned_trades_are_refused(sandbox: Sandbox) -> None:
    qr = sandbox.provider.create_qr_order(order()).qr_content

    with pytest.raises(ProviderRejectedError) as unscanned:
        sandbox.provider.refund(refund(100))
    sandbox.emulator.scan(qr)
    with pytest.raises(ProviderRejectedError) as unpaid:
        sandbox.provider.refund(refund(100))

    assert unscanned.value.code == "ACQ.TRADE_NOT_EXIST"
    assert unpaid.value.code == "ACQ.TRADE_STATUS_ERROR"


def test_out_request_no_defaults_to_out_trade_no(sandbox: Sandbox) -> None:
    paid_trade(sandbox)

    sandbox.provider.client.execute(
        "alipay.trade.refund", {"out_trade_no": "order-0001", "refund_amount": "1.00"}
    )

    assert sandbox.provider.query_refund("order-0001", "order-0001") == RefundOutcome(
        "order-0001", RefundState.SUCCESS, 100, None
    )


def test_a_processing_refund_shows_in_queries_only_later(sandbox: Sandbox) -> None:
    paid_trade(sandbox)
    sandbox.faults.refund_mode["alipay"] = RefundMode.PROCESSING

    outcome = sandbox.provider.refund(refund(300))
    states = [sandbox.provider.query_refund("order-0001", "r-0001").state for _ in range(3)]

    assert outcome.state is RefundState.SUCCESS
    assert states == [RefundState.NOT_FOUND, RefundState.NOT_FOUND, RefundState.SUCCESS]


def test_an_abnormal_refund_is_refused_and_can_be_retried_later(sandbox: Sandbox) -> None:
    paid_trade(sandbox)
    sandbox.faults.refund_mode["alipay"] = RefundMode.ABNORMAL

    with pytest.raises(ProviderRejectedError) as refused:
        sandbox.provider.refund(refund(300))
    after_refusal = sandbox.provider.query_refund("order-0001", "r-0001")
    sandbox.faults.clear()
    retried = sandbox.provider.client.refund("order-0001", "r-0001", 300)

    assert refused.value.code == "ACQ.SELLER_BALANCE_NOT_ENOUGH"
    assert after_refusal.state is RefundState.NOT_FOUND
    assert (retried.fund_change, retried.refund_fee) == ("Y", "3.00")


# --- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [FaultKind.SYSTEM_ERROR, FaultKind.HTTP_500])
def test_a_failed_refund_call_does_nothing_and_the_retry_refunds_once(
    sandbox: Sandbox, kind: FaultKind
) -> None:
    paid_trade(sandbox)
    sandbox.faults.arm("alipay", "alipay.trade.refund", kind)

    with pytest.raises(ProviderUnavailableError):
        sandbox.provider.refund(refund(300))
    before_retry = sandbox.provider.query_refund("order-0001", "r-0001")
    retried = sandbox.provider.client.refund("order-0001", "r-0001", 300)

    assert before_retry.state is RefundState.NOT_FOUND
    assert (retried.fund_change, retried.refund_fee) == ("Y", "3.00")


@pytest.mark.parametrize(
    ("kind", "status", "sub_code"),
    [(FaultKind.SYSTEM_ERROR, 200, "isp.unknow-error"), (FaultKind.HTTP_500, 500, None)],
)
@pytest.mark.parametrize(
    "method",
    [
        "alipay.trade.precreate",
        "alipay.trade.query",
        "alipay.trade.close",
        "alipay.trade.refund",
        "alipay.trade.fastpay.refund.query",
        "alipay.data.dataservice.bill.downloadurl.query",
    ],
)
def test_faults_are_armed_per_method(
    sandbox: Sandbox, method: str, kind: FaultKind, status: int, sub_code: str | None
) -> None:
    sandbox.faults.arm("alipay", method, kind)
    params = sandbox.provider.client.signed_params(method, {"out_trade_no": "x"})

    response = sandbox.http.get(GATEWAY, params=params)
    second = sandbox.http.get(GATEWAY, params=sandbox.provider.client.signed_params(method, {}))

    assert response.status_code == status
    if sub_code is not None:
        body = gateway_body(sandbox, response, method)
        assert (body["code"], body["sub_code"]) == ("20000", sub_code)
    assert second.status_code == 200  # the fault was for one call only
    assert gateway_body(sandbox, second, method)["code"] != "20000"


def test_a_slow_refund_times_out_and_the_retry_refunds_once(sandbox: Sandbox) -> None:
    paid_trade(sandbox)
    sandbox.faults.arm("alipay", "alipay.trade.refund", FaultKind.SLOW)

    with live_server(mount(sandbox.emulator)) as base_url:
        config = dataclasses.replace(
            sandbox.config, gateway_url=f"{base_url}/sandbox/alipay/gateway.do"
        )
        with httpx.Client(timeout=0.1) as http:
            provider = AlipayProvider(config, sandbox.clock, http)
            with pytest.raises(ProviderUnavailableError, match="unreachable"):
                provider.refund(refund(300))
            retried = provider.client.refund("order-0001", "r-0001", 300)
            more = provider.client.refund("order-0001", "r-0002", 500)

    assert (retried.fund_change, retried.refund_fee) == ("N", "3.00")
    assert (more.fund_change, more.refund_fee) == ("Y", "8.00")


# --- bills ------------------------------------------------------------------------------------


def test_the_bill_of_a_day_lists_the_payment_and_the_partial_refund(sandbox: Sandbox) -> None:
    trade_no = paid_trade(sandbox)  # paid 20:30:30 in Beijing
    sandbox.clock.at = START + timedelta(minutes=15)
    sandbox.provider.refund(refund(300))
    sandbox.clock.at = START + timedelta(hours=12, minutes=30)  # 09:00 the next day

    entries = sandbox.provider.fetch_bill(date(2026, 3, 1))

    assert entries == [
        BillEntry(BillEntryKind.PAYMENT, "order-0001", trade_no, None, 800, 5,
                  START + timedelta(seconds=30)),
        BillEntry(BillEntryKind.REFUND, "order-0001", trade_no, "r-0001", 300, -2,
                  START + timedelta(minutes=15)),
    ]  # fmt: skip
    assert sandbox.provider.fetch_bill(date(2026, 2, 28)) == []


def test_todays_bill_does_not_exist_yet_and_the_link_expires(sandbox: Sandbox) -> None:
    paid_trade(sandbox)
    today = sandbox.provider.fetch_bill(date(2026, 3, 1))
    sandbox.clock.at = START + timedelta(days=1)
    link = sandbox.provider.client.bill_download_url(date(2026, 3, 1)).bill_download_url
    sandbox.clock.at += timedelta(seconds=31)

    with pytest.raises(ProviderRejectedError) as expired:
        sandbox.provider.client.download(link)

    assert today == []
    assert link.startswith("http://testserver/sandbox/alipay/bill/")
    assert expired.value.status == 404

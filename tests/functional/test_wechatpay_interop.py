"""An independent WeChat Pay API v3 SDK (wechatpayv3) against our emulator, over real HTTP.

The SDK signs its own requests, verifies our responses with the platform public key
(public-key mode) and decrypts our notifies; if our wire format drifted from the
provider's, these calls would fail on the SDK's side, not only on ours. The SDK is
pointed at the loopback gateway by setting its gateway attribute, here only.
"""

import gzip
import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import uvicorn
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI
from wechatpayv3 import WeChatPay, WeChatPayType

from roompay.clock import SystemClock
from roompay.payments import crypto
from roompay.payments.base import BillEntry, BillEntryKind, TradeSnapshot, TradeState
from roompay.payments.wechatpay import WechatPayConfig, WechatPayProvider, wire
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay.adapter import bill_entries
from roompay.sandbox.notifier import Notifier
from roompay.sandbox.wechatpay import WechatPayEmulator

PREFIX = "/sandbox/wechatpay"
NOTIFY_URL = "http://127.0.0.1:9/api/v1/notify/wechatpay"  # captured, never connected to
DESCRIPTION = "烘干 30 分钟"  # not ASCII: the SDK signs and sends it JSON-escaped


@dataclass
class Notifies:
    """The merchant notify endpoint: keeps each notify and tells when one arrives."""

    received: list[httpx.Request]
    arrived: threading.Event

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        self.arrived.set()
        return httpx.Response(204)


@dataclass
class Gateway:
    """The emulator served by uvicorn on loopback, and a merchant registered there."""

    emulator: WechatPayEmulator
    base_url: str
    registration: dict[str, str]
    merchant_key_pem: str
    notifies: Notifies
    portal: BlockingPortal

    def sdk(self) -> Any:
        """A wechatpayv3 client for the merchant, in public-key mode."""
        answer = self.registration
        client = WeChatPay(
            wechatpay_type=WeChatPayType.NATIVE,
            mchid=answer["mchid"],
            private_key=self.merchant_key_pem,
            cert_serial_no=answer["serial_no"],
            appid=answer["appid"],
            apiv3_key=answer["apiv3_key"],
            notify_url=NOTIFY_URL,
            public_key=answer["public_key_pem"],
            public_key_id=answer["public_key_id"],
            timeout=(5, 10),
        )
        client._core._gate_way = self.base_url  # the one redirect: loopback, not production
        return client

    def provider(self) -> WechatPayProvider:
        """Our own provider for the same merchant."""
        answer = self.registration
        config = WechatPayConfig(
            mchid=answer["mchid"],
            appid=answer["appid"],
            merchant_serial_no=answer["serial_no"],
            merchant_private_key_pem=self.merchant_key_pem,
            apiv3_key=answer["apiv3_key"],
            platform_public_key_pem=answer["public_key_pem"],
            platform_public_key_id=answer["public_key_id"],
            base_url=self.base_url,
        )
        return WechatPayProvider(config, SystemClock())

    def guest_pays(self, code_url: str) -> httpx.Request:
        """Pay as the guest and return the payment notify the merchant receives."""
        self.notifies.arrived.clear()
        self.portal.call(self.emulator.guest_pay, code_url)
        assert self.notifies.arrived.wait(timeout=10)
        return self.notifies.received[-1]


def serve(app: FastAPI) -> Iterator[str]:
    """Serve an app with uvicorn on a loopback socket that already listens."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections queue from now on, so nothing waits for start-up
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    notifies = Notifies([], threading.Event())
    with start_blocking_portal() as portal:
        # The notifier lives on the portal's loop, where guest_pay schedules deliveries.
        notifier = Notifier(transport=httpx.MockTransport(notifies.handle))
        emulator = WechatPayEmulator(tmp_path_factory.mktemp("wechatpay"), SystemClock(), notifier)
        app = FastAPI()
        app.include_router(emulator.router(), prefix=PREFIX)
        for root in serve(app):
            merchant_key_pem = crypto.private_key_pem(crypto.generate_private_key())
            public_pem = crypto.public_key_pem(crypto.load_private_key(merchant_key_pem))
            response = httpx.post(f"{root}{PREFIX}/merchants", json={"public_key_pem": public_pem})
            assert response.status_code == 201
            yield Gateway(
                emulator, f"{root}{PREFIX}", response.json(), merchant_key_pem, notifies, portal
            )
        portal.call(notifier.aclose)


def time_expire() -> str:
    later = datetime.now(UTC) + timedelta(minutes=5)
    return later.astimezone(c.CHINA_TZ).isoformat(timespec="seconds")


def create(sdk: Any, out_trade_no: str, total: int = 800, expire: str | None = None) -> str:
    code, text = sdk.pay(
        description=DESCRIPTION,
        out_trade_no=out_trade_no,
        amount={"total": total, "currency": "CNY"},
        time_expire=expire or time_expire(),
    )
    assert code == 200
    answer = json.loads(text)
    assert list(answer) == ["code_url"]
    return str(answer["code_url"])


def query(sdk: Any, out_trade_no: str) -> dict[str, Any]:
    code, text = sdk.query(out_trade_no=out_trade_no)
    assert code == 200
    answer: dict[str, Any] = json.loads(text)
    return answer


def test_the_sdk_creates_a_native_order_and_queries_it_unpaid(gateway: Gateway) -> None:
    sdk = gateway.sdk()

    # A retry sends the very same request: a time_expire computed again could fall in the
    # next second, and the provider refuses a repeat whose parameters differ.
    expire = time_expire()
    code_url = create(sdk, "SDK20250520000001", expire=expire)
    again = create(sdk, "SDK20250520000001", expire=expire)
    transaction = query(sdk, "SDK20250520000001")

    assert code_url.startswith(c.CODE_URL_PREFIX)
    assert again == code_url
    assert transaction == {
        "appid": gateway.registration["appid"],
        "mchid": gateway.registration["mchid"],
        "out_trade_no": "SDK20250520000001",
        "trade_type": "NATIVE",
        "trade_state": "NOTPAY",
        "trade_state_desc": "订单未支付",
        "attach": "",
        "amount": {"total": 800, "payer_currency": "CNY"},
    }
    provider = gateway.provider()
    assert provider.query_trade("SDK20250520000001") == TradeSnapshot(
        "SDK20250520000001", TradeState.NOT_PAID, 800, None, None
    )
    provider.close()


def test_the_sdk_closes_an_order_with_a_verified_204_and_then_sees_order_closed(
    gateway: Gateway,
) -> None:
    sdk = gateway.sdk()
    create(sdk, "SDK20250520000002")

    closed = sdk.close(out_trade_no="SDK20250520000002")
    again_code, again_text = sdk.close(out_trade_no="SDK20250520000002")

    assert closed == (204, b"")
    assert (again_code, json.loads(again_text)) == (
        400,
        {"code": "ORDER_CLOSED", "message": "订单已关闭"},
    )
    assert query(sdk, "SDK20250520000002")["trade_state"] == "CLOSED"


def test_the_sdk_verifies_and_decrypts_our_payment_notify(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    code_url = create(sdk, "SDK20250520000003")

    notify = gateway.guest_pays(code_url)
    headers = dict(notify.headers)  # lower-case names, as a FastAPI app sees them
    title_case = {name.title(): value for name, value in headers.items()}
    callback = sdk.callback(headers, notify.content)

    transaction = query(sdk, "SDK20250520000003")
    envelope = json.loads(notify.content)
    assert callback == {**envelope, "resource": transaction}
    assert sdk.callback(title_case, notify.content) == callback
    assert transaction["trade_state"] == "SUCCESS"
    assert transaction["amount"] == {
        "total": 800,
        "payer_total": 800,
        "currency": "CNY",
        "payer_currency": "CNY",
    }
    assert (envelope["event_type"], envelope["resource"]["original_type"]) == (
        "TRANSACTION.SUCCESS",
        "transaction",
    )


def test_the_sdk_refuses_a_notify_altered_on_the_way(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    notify = gateway.guest_pays(create(sdk, "SDK20250520000004"))
    altered = notify.content.replace(b'"summary":"', b'"summary":"!')

    assert sdk.callback(dict(notify.headers), altered) is None


def test_the_sdk_refunds_partly_once_per_key_and_queries_the_refund(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    gateway.guest_pays(create(sdk, "SDK20250520000005"))
    amount = {"refund": 300, "total": 800, "currency": "CNY"}

    code, text = sdk.refund(
        out_refund_no="SDKR20250520000005", amount=amount, out_trade_no="SDK20250520000005"
    )
    again_code, again_text = sdk.refund(
        out_refund_no="SDKR20250520000005", amount=amount, out_trade_no="SDK20250520000005"
    )
    too_much = sdk.refund(
        out_refund_no="SDKR20250520000006",
        amount={"refund": 501, "total": 800, "currency": "CNY"},
        out_trade_no="SDK20250520000005",
    )
    query_code, query_text = sdk.query_refund(out_refund_no="SDKR20250520000005")

    refund = json.loads(text)
    assert (code, again_code, query_code) == (200, 200, 200)
    assert json.loads(again_text) == refund
    assert json.loads(query_text) == refund
    assert (too_much[0], json.loads(too_much[1])["code"]) == (403, "NOT_ENOUGH")
    assert (refund["status"], refund["out_trade_no"], refund["out_refund_no"]) == (
        "SUCCESS",
        "SDK20250520000005",
        "SDKR20250520000005",
    )
    assert refund["amount"]["refund"] == 300
    assert refund["amount"]["total"] == 800
    assert refund["transaction_id"] == query(sdk, "SDK20250520000005")["transaction_id"]
    assert query(sdk, "SDK20250520000005")["trade_state"] == "REFUND"


def test_the_sdk_downloads_the_trade_bill_whose_hash_and_lines_match(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    gateway.guest_pays(create(sdk, "SDK20250520000007", total=1000))
    transaction = query(sdk, "SDK20250520000007")
    paid_at = datetime.fromisoformat(transaction["success_time"])

    code, text = sdk.trade_bill(bill_date=paid_at.date().isoformat())
    bill = json.loads(text)
    download_code, content = sdk.download_bill(bill["download_url"])

    assert (code, download_code, bill["hash_type"]) == (200, 200, "SHA1")
    assert bill["download_url"].startswith(f"{gateway.base_url}/v3/billdownload/file?token=")
    plain = gzip.decompress(content)
    assert hashlib.sha1(plain, usedforsecurity=False).hexdigest() == bill["hash_value"]
    entries = bill_entries(wire.parse_trade_bill(plain.decode()))
    assert (
        BillEntry(
            BillEntryKind.PAYMENT,
            "SDK20250520000007",
            transaction["transaction_id"],
            None,
            1000,
            6,
            paid_at.astimezone(UTC),
        )
        in entries
    )
    provider = gateway.provider()
    assert provider.fetch_bill(paid_at.date()) == entries
    provider.close()


def test_an_sdk_request_signed_with_another_key_is_sign_error(gateway: Gateway) -> None:
    sdk = gateway.sdk()
    sdk._core._private_key = crypto.generate_private_key()

    code, text = sdk.query(out_trade_no="SDK20250520000001")

    assert (code, json.loads(text)) == (
        401,
        {"code": "SIGN_ERROR", "message": "signature does not verify"},
    )

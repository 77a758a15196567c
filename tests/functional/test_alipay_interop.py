"""An independent Alipay SDK (module `alipay`) against the emulator, over real HTTP.

The SDK is what a third-party merchant would use against the real gateway: it sends
GET with every param in the query string, signs `biz_content` as ASCII-escaped
JSON, finds the signed text in our answers by its own brace matching, and verifies
notifies by its own reading of the rule. Agreement with it shows that the emulator
speaks Alipay's wire format, not merely roompay's idea of it.

The SDK stamps `timestamp` with naive local time, so the emulator's clock here is
the local wall clock read as Beijing time: the two agree in any time zone.
"""

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from alipay import AliPay
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from roompay.payments.alipay.constants import BEIJING
from roompay.payments.crypto import generate_private_key, private_key_pem, public_key_pem
from roompay.sandbox.alipay import AlipayEmulator
from roompay.sandbox.notifier import Notifier
from tests.support.live import live_server

NOTIFY_URL = "http://merchant.test/notify/alipay"


class LocalWallClock:
    """The local wall-clock time, labelled as Beijing time, as the SDK's timestamps are."""

    def now(self) -> datetime:
        return datetime.now().astimezone().replace(tzinfo=BEIJING)


@dataclass
class Interop:
    sdk: Any  # the SDK's AliPay client (untyped)
    emulator: AlipayEmulator
    notifies: list[httpx.Request]
    app_id: str
    seller_id: str


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return generate_private_key()


@pytest.fixture
def interop(tmp_path: Path, app_key: rsa.RSAPrivateKey) -> Iterator[Interop]:
    notifies: list[httpx.Request] = []

    def merchant(request: httpx.Request) -> httpx.Response:
        notifies.append(request)
        return httpx.Response(200, text="success")

    notifier = Notifier(transport=httpx.MockTransport(merchant))
    emulator = AlipayEmulator(tmp_path, LocalWallClock(), notifier)
    app = FastAPI()
    app.include_router(emulator.router(), prefix="/sandbox/alipay")
    with live_server(app) as base_url:
        created = httpx.post(
            f"{base_url}/sandbox/alipay/merchants",
            json={"public_key_pem": public_key_pem(app_key)},
        ).json()
        sdk = AliPay(
            appid=created["app_id"],
            app_notify_url=NOTIFY_URL,
            app_private_key_string=private_key_pem(app_key),
            alipay_public_key_string=created["public_key_pem"],
            sign_type="RSA2",
        )
        # The SDK knows only Alipay's two gateways; point it at ours.
        sdk._gateway = f"{base_url}/sandbox/alipay/gateway.do"
        yield Interop(sdk, emulator, notifies, created["app_id"], created["seller_id"])
    asyncio.run(notifier.aclose())


def precreate(interop: Interop, out_trade_no: str = "o-0001") -> dict[str, str]:
    result: dict[str, str] = interop.sdk.api_alipay_trade_precreate(
        subject="干衣机 30 分钟", out_trade_no=out_trade_no, total_amount="8.00",
        timeout_express="5m",
    )  # fmt: skip
    return result


def pay(interop: Interop, qr: str) -> dict[str, str]:
    async def scenario() -> dict[str, str]:
        paid = await interop.emulator.guest_pay(qr)
        async with asyncio.timeout(5):
            while not interop.notifies:
                await asyncio.sleep(0.001)
        return paid

    return asyncio.run(scenario())


def test_precreate_by_the_sdk(interop: Interop) -> None:
    result = precreate(interop)

    assert result == {
        "code": "10000",
        "msg": "Success",
        "out_trade_no": "o-0001",
        "qr_code": result["qr_code"],
    }
    assert interop.emulator.owns_qr(result["qr_code"])


def test_query_and_close_by_the_sdk(interop: Interop) -> None:
    qr = precreate(interop)["qr_code"]

    unscanned = interop.sdk.api_alipay_trade_query(out_trade_no="o-0001")
    close_unscanned = interop.sdk.api_alipay_trade_close(out_trade_no="o-0001")
    interop.emulator.scan(qr)
    scanned = interop.sdk.api_alipay_trade_query(out_trade_no="o-0001")
    closed = interop.sdk.api_alipay_trade_close(out_trade_no="o-0001")
    after_close = interop.sdk.api_alipay_trade_query(out_trade_no="o-0001")

    not_exist = {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST",
                 "sub_msg": "交易不存在"}  # fmt: skip
    assert unscanned == not_exist
    assert close_unscanned == not_exist
    trade_no = scanned["trade_no"]
    assert scanned == {
        "code": "10000",
        "msg": "Success",
        "trade_no": trade_no,
        "out_trade_no": "o-0001",
        "buyer_logon_id": "gue***@example.com",
        "buyer_user_id": scanned["buyer_user_id"],
        "trade_status": "WAIT_BUYER_PAY",
        "total_amount": "8.00",
        "receipt_amount": "0.00",
        "buyer_pay_amount": "0.00",
        "invoice_amount": "0.00",
        "point_amount": "0.00",
    }
    assert closed == {"code": "10000", "msg": "Success", "trade_no": trade_no,
                      "out_trade_no": "o-0001"}  # fmt: skip
    assert after_close["trade_status"] == "TRADE_CLOSED"


def test_refund_and_refund_query_by_the_sdk(interop: Interop) -> None:
    paid = pay(interop, precreate(interop)["qr_code"])

    first = interop.sdk.api_alipay_trade_refund(
        refund_amount="3.00", out_trade_no="o-0001", out_request_no="r-0001"
    )
    again = interop.sdk.api_alipay_trade_refund(
        refund_amount="3.00", out_trade_no="o-0001", out_request_no="r-0001"
    )
    discordant = interop.sdk.api_alipay_trade_refund(
        refund_amount="4.00", out_trade_no="o-0001", out_request_no="r-0001"
    )
    queried = interop.sdk.api_alipay_trade_fastpay_refund_query("r-0001", out_trade_no="o-0001")
    unknown = interop.sdk.api_alipay_trade_fastpay_refund_query("r-0002", out_trade_no="o-0001")
    paid_query = interop.sdk.api_alipay_trade_query(out_trade_no="o-0001")

    assert first == {
        "code": "10000",
        "msg": "Success",
        "trade_no": paid["trade_no"],
        "out_trade_no": "o-0001",
        "buyer_logon_id": "gue***@example.com",
        "buyer_user_id": first["buyer_user_id"],
        "fund_change": "Y",
        "refund_fee": "3.00",
        "gmt_refund_pay": first["gmt_refund_pay"],
        "send_back_fee": "3.00",
    }
    assert again == first | {"fund_change": "N"}
    assert (discordant["code"], discordant["sub_code"]) == (
        "40004",
        "ACQ.DISCORDANT_REPEAT_REQUEST",
    )
    assert queried == {
        "code": "10000",
        "msg": "Success",
        "trade_no": paid["trade_no"],
        "out_trade_no": "o-0001",
        "out_request_no": "r-0001",
        "total_amount": "8.00",
        "refund_amount": "3.00",
        "refund_status": "REFUND_SUCCESS",
    }
    assert unknown == {"code": "10000", "msg": "Success", "trade_no": paid["trade_no"],
                       "out_trade_no": "o-0001"}  # fmt: skip
    assert paid_query["trade_status"] == "TRADE_SUCCESS"


def test_the_sdk_verifies_the_emulators_notify(interop: Interop) -> None:
    pay(interop, precreate(interop)["qr_code"])
    (request,) = interop.notifies
    fields = dict(parse_qsl(request.content.decode(), keep_blank_values=True))
    signature = fields.pop("sign")
    tampered = fields | {"total_amount": "0.01"}

    assert fields["app_id"] == interop.app_id
    assert fields["seller_id"] == interop.seller_id
    assert interop.sdk.verify(dict(fields), signature) is True
    assert interop.sdk.verify(tampered, signature) is False

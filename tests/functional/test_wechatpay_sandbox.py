"""WechatPayProvider against the WeChat Pay emulator, through a real FastAPI app."""

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from roompay.domain.catalog import Wallet
from roompay.payments import crypto
from roompay.payments.base import QrOrderRequest, TradeState
from roompay.payments.errors import ProviderRejectedError, ProviderSignatureError
from roompay.payments.wechatpay import WechatPayConfig, WechatPayProvider, wire
from roompay.payments.wechatpay import constants as c
from roompay.sandbox.notifier import DeliveryRecord, Notifier
from roompay.sandbox.wechatpay import WechatPayEmulator

PREFIX = "/sandbox/wechatpay"
BASE_URL = f"http://testserver{PREFIX}"
NOTIFY_URL = "http://127.0.0.1:8000/api/v1/notify/wechatpay"
START = datetime(2025, 5, 20, 5, 0, 0, tzinfo=UTC)


@dataclass
class FakeClock:
    """A clock the test moves by hand."""

    current: datetime = START

    def now(self) -> datetime:
        return self.current


class AppTransport(httpx.BaseTransport):
    """Serve a sync client from an ASGI app running on a blocking portal's event loop.

    Plays the role of the test client: the app runs for real on its own loop while the
    synchronous merchant client calls it through plain httpx.
    """

    def __init__(self, app: FastAPI, portal: BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._portal.call(self._send, request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._asgi.handle_async_request(request)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=content)


@dataclass
class Sandbox:
    """One running emulator, the app it is mounted in, and a merchant registered there."""

    emulator: WechatPayEmulator
    http: httpx.Client
    transport: AppTransport
    clock: FakeClock
    config: WechatPayConfig
    notifier: Notifier
    received: list[httpx.Request]


@pytest.fixture(scope="module")
def merchant_key_pem() -> str:
    return crypto.private_key_pem(crypto.generate_private_key())


def make_app(emulator: WechatPayEmulator) -> FastAPI:
    app = FastAPI()
    app.include_router(emulator.router(), prefix=PREFIX)
    return app


def register(http: httpx.Client, merchant_key_pem: str) -> WechatPayConfig:
    public_pem = crypto.public_key_pem(crypto.load_private_key(merchant_key_pem))
    response = http.post(f"{PREFIX}/merchants", json={"public_key_pem": public_pem})
    assert response.status_code == 201
    answer = response.json()
    return WechatPayConfig(
        mchid=answer["mchid"],
        appid=answer["appid"],
        merchant_serial_no=answer["serial_no"],
        merchant_private_key_pem=merchant_key_pem,
        apiv3_key=answer["apiv3_key"],
        platform_public_key_pem=answer["public_key_pem"],
        platform_public_key_id=answer["public_key_id"],
        base_url=BASE_URL,
    )


def receiver(received: list[httpx.Request], statuses: list[int]) -> httpx.MockTransport:
    """A merchant notify endpoint answering the given statuses in turn, then 204."""

    def handle(request: httpx.Request) -> httpx.Response:
        received.append(request)
        status = statuses.pop(0) if statuses else 204
        return httpx.Response(status)

    return httpx.MockTransport(handle)


def build_sandbox(
    tmp_path: Path, merchant_key_pem: str, statuses: list[int], time_scale: float = 1.0
) -> Iterator[Sandbox]:
    clock = FakeClock()
    received: list[httpx.Request] = []
    notifier = Notifier(time_scale=time_scale, transport=receiver(received, statuses))
    emulator = WechatPayEmulator(tmp_path, clock, notifier)
    with start_blocking_portal() as portal:
        transport = AppTransport(make_app(emulator), portal)
        with httpx.Client(transport=transport, base_url="http://testserver") as http:
            config = register(http, merchant_key_pem)
            yield Sandbox(emulator, http, transport, clock, config, notifier, received)


@pytest.fixture
def sandbox(tmp_path: Path, merchant_key_pem: str) -> Iterator[Sandbox]:
    yield from build_sandbox(tmp_path, merchant_key_pem, statuses=[])


@pytest.fixture
def provider(sandbox: Sandbox) -> WechatPayProvider:
    return WechatPayProvider(sandbox.config, sandbox.clock, http_client=sandbox.http)


def order_request(out_trade_no: str = "T20250520000001", amount_fen: int = 800) -> QrOrderRequest:
    return QrOrderRequest(
        out_trade_no=out_trade_no,
        description="Dry 30 min",
        amount_fen=amount_fen,
        expires_at=START + timedelta(minutes=5),
        notify_url=NOTIFY_URL,
    )


async def wait_until_settled(notifier: Notifier, record: DeliveryRecord) -> None:
    """Let the background delivery run until it succeeds, then stop the notifier."""

    async def settled() -> None:
        while not record.delivered:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(settled(), timeout=10)
    await notifier.aclose()


def pay(sandbox: Sandbox, qr: str) -> dict[str, str]:
    """Pay as the guest and wait for the notify to be delivered."""

    async def run() -> dict[str, str]:
        answer = await sandbox.emulator.guest_pay(qr)
        await wait_until_settled(sandbox.notifier, sandbox.notifier.records[-1])
        return answer

    return asyncio.run(run())


# --- orders ----------------------------------------------------------------------------


def test_given_a_registered_merchant_when_creating_an_order_then_a_code_url_comes_back(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    order = provider.create_qr_order(order_request())

    assert order.out_trade_no == "T20250520000001"
    assert order.qr_content.startswith("weixin://wxpay/bizpayurl?pr=")
    assert sandbox.emulator.owns_qr(order.qr_content) is True
    assert sandbox.emulator.owns_qr(c.CODE_URL_PREFIX + "unknown") is False
    assert provider.query_state("T20250520000001") == TradeState.NOT_PAID


def test_registration_answers_exactly_what_a_merchant_needs(sandbox: Sandbox) -> None:
    public_pem = crypto.public_key_pem(crypto.generate_private_key())
    answer = sandbox.http.post(f"{PREFIX}/merchants", json={"public_key_pem": public_pem}).json()

    assert sorted(answer) == [
        "apiv3_key",
        "appid",
        "mchid",
        "public_key_id",
        "public_key_pem",
        "serial_no",
    ]
    assert len(answer["mchid"]) == 10
    assert answer["mchid"].isdigit()
    assert len(answer["appid"]) == 18
    assert answer["appid"].startswith("wx")
    assert answer["serial_no"] == answer["serial_no"].upper()
    assert len(answer["apiv3_key"]) == 32
    assert answer["public_key_id"].startswith("PUB_KEY_ID_")
    assert answer["public_key_id"].removeprefix("PUB_KEY_ID_").isdigit()


def test_registration_with_an_invalid_pem_is_a_param_error(sandbox: Sandbox) -> None:
    response = sandbox.http.post(f"{PREFIX}/merchants", json={"public_key_pem": "nope"})

    assert response.status_code == 400
    assert response.json()["code"] == "PARAM_ERROR"
    assert response.json()["message"].startswith("public_key_pem is not an RSA public key")


def test_a_restarted_emulator_keeps_its_key_and_merchants(tmp_path: Path, sandbox: Sandbox) -> None:
    restarted = WechatPayEmulator(tmp_path, sandbox.clock, Notifier())
    with (
        start_blocking_portal() as portal,
        httpx.Client(
            transport=AppTransport(make_app(restarted), portal), base_url="http://testserver"
        ) as http,
    ):
        provider = WechatPayProvider(sandbox.config, sandbox.clock, http_client=http)
        order = provider.create_qr_order(order_request())

    assert restarted.public_key_id == sandbox.emulator.public_key_id
    assert order.qr_content.startswith(c.CODE_URL_PREFIX)


def test_the_same_out_trade_no_with_the_same_parameters_returns_the_same_code_url(
    provider: WechatPayProvider,
) -> None:
    first = provider.create_qr_order(order_request())
    second = provider.create_qr_order(order_request())

    assert second.qr_content == first.qr_content


def test_the_same_out_trade_no_with_other_parameters_is_out_trade_no_used(
    provider: WechatPayProvider,
) -> None:
    provider.create_qr_order(order_request(amount_fen=800))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(order_request(amount_fen=1500))

    assert (caught.value.code, caught.value.status) == ("OUT_TRADE_NO_USED", 400)


@pytest.mark.parametrize(
    ("out_trade_no", "amount_fen"),
    [("T1", 800), ("T" * 33, 800), ("T2025 0520", 800), ("T20250520000001", 0)],
)
def test_an_invalid_order_is_a_param_error(
    provider: WechatPayProvider, out_trade_no: str, amount_fen: int
) -> None:
    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(order_request(out_trade_no, amount_fen))

    assert (caught.value.code, caught.value.status) == ("PARAM_ERROR", 400)
    field = "out_trade_no" if amount_fen else "amount.total"
    assert caught.value.message.startswith(f"{field}: ")


def test_an_order_for_another_app_is_a_param_error(sandbox: Sandbox) -> None:
    config = WechatPayConfig(**{**_fields(sandbox.config), "appid": "wx0000000000000000"})
    provider = WechatPayProvider(config, sandbox.clock, http_client=sandbox.http)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(order_request())

    assert (caught.value.code, caught.value.status) == ("PARAM_ERROR", 400)


def _fields(config: WechatPayConfig) -> dict[str, str]:
    return {name: getattr(config, name) for name in WechatPayConfig.__dataclass_fields__}


# --- authentication ---------------------------------------------------------------------


def raw_native_call(
    sandbox: Sandbox,
    body: bytes,
    *,
    signed_body: bytes | None = None,
    skew_s: int = 0,
    go_order: bool = False,
) -> httpx.Response:
    """POST a Native order signed by hand; `signed_body` differs from `body` to tamper."""
    key = crypto.load_private_key(sandbox.config.merchant_private_key_pem)
    timestamp = str(int(sandbox.clock.now().timestamp()) + skew_s)
    nonce = "593BEC0C930BF1AFEB40B4A08C8FB242"
    message = wire.request_message(
        "POST", c.PATH_NATIVE, timestamp, nonce, body if signed_body is None else signed_body
    )
    signature = crypto.sign_b64(key, message)
    mchid, serial = sandbox.config.mchid, sandbox.config.merchant_serial_no
    if go_order:
        params = (
            f'mchid="{mchid}",nonce_str="{nonce}",timestamp="{timestamp}",'
            f'serial_no="{serial}",signature="{signature}"'
        )
    else:
        params = (
            f'mchid="{mchid}",nonce_str="{nonce}",signature="{signature}",'
            f'timestamp="{timestamp}",serial_no="{serial}"'
        )
    return sandbox.http.post(
        f"{PREFIX}{c.PATH_NATIVE}",
        content=body,
        headers={
            "Authorization": f"WECHATPAY2-SHA256-RSA2048 {params}",
            "Content-Type": "application/json",
        },
    )


def native_body(config: WechatPayConfig, total: int = 800) -> bytes:
    return json.dumps(
        {
            "appid": config.appid,
            "mchid": config.mchid,
            "description": "Dry 30 min",
            "out_trade_no": "T20250520000001",
            "notify_url": NOTIFY_URL,
            "amount": {"total": total, "currency": "CNY"},
        }
    ).encode()


def test_a_hand_signed_request_is_accepted_whatever_the_authorization_key_order(
    sandbox: Sandbox,
) -> None:
    body = native_body(sandbox.config)

    first = raw_native_call(sandbox, body)
    second = raw_native_call(sandbox, body, go_order=True)

    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["code_url"] == second.json()["code_url"]


def test_a_request_whose_body_was_altered_is_sign_error(sandbox: Sandbox) -> None:
    signed = native_body(sandbox.config, total=800)

    response = raw_native_call(sandbox, native_body(sandbox.config, total=1), signed_body=signed)

    assert response.status_code == 401
    assert response.json() == {"code": "SIGN_ERROR", "message": "signature does not verify"}
    provider = WechatPayProvider(sandbox.config, sandbox.clock, http_client=sandbox.http)
    assert provider.query_state("T20250520000001") == TradeState.NOT_FOUND


@pytest.mark.parametrize(("skew_s", "status"), [(-301, 401), (-299, 200), (299, 200), (301, 401)])
def test_the_request_timestamp_may_be_at_most_300_s_off(
    sandbox: Sandbox, skew_s: int, status: int
) -> None:
    response = raw_native_call(sandbox, native_body(sandbox.config), skew_s=skew_s)

    assert response.status_code == status


def test_a_request_through_a_tampering_proxy_is_sign_error(sandbox: Sandbox) -> None:
    inner = sandbox.transport  # wrapped by the tampering proxy

    def tamper(request: httpx.Request) -> httpx.Response:
        # Same length, another amount: only the signature can tell.
        altered = request.content.replace(b'"total":800', b'"total":900')
        return inner.handle_request(
            httpx.Request(request.method, request.url, headers=request.headers, content=altered)
        )

    provider = WechatPayProvider(
        sandbox.config, sandbox.clock, transport=httpx.MockTransport(tamper)
    )

    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(order_request())

    assert (caught.value.code, caught.value.status) == ("SIGN_ERROR", 401)
    provider.close()


def test_a_request_with_a_wrong_serial_no_is_sign_error(sandbox: Sandbox) -> None:
    config = WechatPayConfig(**{**_fields(sandbox.config), "merchant_serial_no": "ABCDEF"})
    provider = WechatPayProvider(config, sandbox.clock, http_client=sandbox.http)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(order_request())

    assert (caught.value.code, caught.value.status, caught.value.message) == (
        "SIGN_ERROR",
        401,
        "unknown mchid or serial_no",
    )


def test_a_request_without_authorization_gets_a_signed_sign_error(sandbox: Sandbox) -> None:
    response = sandbox.http.post(f"{PREFIX}{c.PATH_NATIVE}", content=b"{}")

    assert response.status_code == 401
    assert response.json()["code"] == "SIGN_ERROR"
    assert response.headers["Wechatpay-Signature-Type"] == "WECHATPAY2-SHA256-RSA2048"
    assert response.headers["Wechatpay-Serial"] == sandbox.config.platform_public_key_id
    platform_key = crypto.load_public_key(sandbox.config.platform_public_key_pem)
    wire.verify_platform_signature(
        wire.lower_keys(response.headers),
        response.content,
        {sandbox.config.platform_public_key_id: platform_key},
        sandbox.clock.now(),
    )


def test_a_response_with_a_tampered_signature_is_refused(sandbox: Sandbox) -> None:
    inner = sandbox.transport

    def tamper(request: httpx.Request) -> httpx.Response:
        response = inner.handle_request(request)
        headers = dict(response.headers)
        signature = headers["wechatpay-signature"]
        headers["wechatpay-signature"] = ("B" if signature[0] == "A" else "A") + signature[1:]
        return httpx.Response(response.status_code, headers=headers, content=response.content)

    provider = WechatPayProvider(
        sandbox.config, sandbox.clock, transport=httpx.MockTransport(tamper)
    )

    with pytest.raises(ProviderSignatureError, match="platform signature does not verify"):
        provider.create_qr_order(order_request())
    provider.close()


def test_a_response_signed_more_than_300_s_off_the_client_clock_is_refused(
    sandbox: Sandbox,
) -> None:
    # The gateway's clock runs 301 s ahead: it accepts nothing and the client trusts nothing.
    sandbox.clock.current = START + timedelta(seconds=301)
    provider = WechatPayProvider(sandbox.config, FakeClock(START), http_client=sandbox.http)

    with pytest.raises(ProviderSignatureError, match="301 s away from now"):
        provider.query_state("T20250520000001")


# --- query and close --------------------------------------------------------------------


def test_querying_an_unknown_order_is_not_found(provider: WechatPayProvider) -> None:
    assert provider.query_state("T20250520099999") == TradeState.NOT_FOUND


def test_closing_an_unpaid_order_answers_204_then_it_is_closed(
    provider: WechatPayProvider,
) -> None:
    provider.create_qr_order(order_request())

    provider.client.close_order("T20250520000001")

    transaction = provider.client.query_order("T20250520000001")
    assert (transaction.trade_state, transaction.trade_state_desc) == ("CLOSED", "订单已关闭")
    provider.close_order("T20250520000001")  # closing again is not an error for us


def test_closing_an_unknown_order_is_order_not_exist(provider: WechatPayProvider) -> None:
    with pytest.raises(ProviderRejectedError) as caught:
        provider.client.close_order("T20250520099999")

    assert (caught.value.code, caught.value.status) == ("ORDER_NOT_EXIST", 404)


def test_closing_a_paid_order_is_orderpaid(sandbox: Sandbox, provider: WechatPayProvider) -> None:
    order = provider.create_qr_order(order_request())
    pay(sandbox, order.qr_content)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.client.close_order("T20250520000001")

    assert (caught.value.code, caught.value.status) == ("ORDERPAID", 400)


# --- the guest pays -----------------------------------------------------------------------


def test_guest_pay_sends_a_notify_the_provider_accepts(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    order = provider.create_qr_order(order_request())
    sandbox.clock.current = START + timedelta(minutes=1)

    answer = pay(sandbox, order.qr_content)

    assert len(sandbox.received) == 1
    captured = sandbox.received[0]
    assert str(captured.url) == NOTIFY_URL
    notification = provider.parse_notification(
        dict(captured.headers), captured.content, sandbox.clock.now()
    )
    assert notification.wallet == Wallet.WECHAT
    assert notification.out_trade_no == "T20250520000001"
    assert notification.provider_trade_no == answer["transaction_id"]
    assert notification.state == TradeState.SUCCESS
    assert notification.amount_fen == 800
    assert notification.paid_at == START + timedelta(minutes=1)
    assert notification.notification_id == json.loads(captured.content)["id"]
    assert notification.merchant_ok is True
    assert answer == {
        "provider": "wechatpay",
        "out_trade_no": "T20250520000001",
        "transaction_id": answer["transaction_id"],
    }
    assert len(answer["transaction_id"]) == 28
    assert answer["transaction_id"].startswith("4200")


def test_a_paid_order_queries_as_success_with_the_payment_details(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    order = provider.create_qr_order(order_request())
    answer = pay(sandbox, order.qr_content)

    transaction = provider.client.query_order("T20250520000001")

    assert transaction.trade_state == "SUCCESS"
    assert transaction.transaction_id == answer["transaction_id"]
    assert transaction.trade_type == "NATIVE"
    assert transaction.bank_type == "OTHERS"
    assert transaction.success_time == START
    assert transaction.amount.total == 800
    assert transaction.amount.payer_total == 800
    assert transaction.payer is not None
    assert transaction.payer.openid is not None
    assert provider.query_state("T20250520000001") == TradeState.SUCCESS


def test_guest_pay_refuses_an_unknown_a_paid_and_an_expired_code(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    paid = provider.create_qr_order(order_request("T20250520000001"))
    late = provider.create_qr_order(order_request("T20250520000002"))
    pay(sandbox, paid.qr_content)

    with pytest.raises(ValueError, match="unknown WeChat Pay code_url"):
        asyncio.run(sandbox.emulator.guest_pay(c.CODE_URL_PREFIX + "nothing"))
    with pytest.raises(ValueError, match="already paid"):
        asyncio.run(sandbox.emulator.guest_pay(paid.qr_content))
    sandbox.clock.current = START + timedelta(minutes=5)
    with pytest.raises(ValueError, match="expired"):
        asyncio.run(sandbox.emulator.guest_pay(late.qr_content))
    assert len(sandbox.received) == 1  # only the one real payment notified


def test_guest_pay_refuses_a_closed_order(sandbox: Sandbox, provider: WechatPayProvider) -> None:
    order = provider.create_qr_order(order_request())
    provider.close_order("T20250520000001")

    with pytest.raises(ValueError, match="closed"):
        asyncio.run(sandbox.emulator.guest_pay(order.qr_content))
    assert sandbox.received == []


def test_a_notify_answered_with_500_is_sent_again_on_the_scaled_schedule(
    tmp_path: Path, merchant_key_pem: str
) -> None:
    # 15 s scaled down 1000 times: the retry comes 15 ms after the refused delivery.
    for sandbox in build_sandbox(tmp_path, merchant_key_pem, statuses=[500], time_scale=1000):
        provider = WechatPayProvider(sandbox.config, sandbox.clock, http_client=sandbox.http)
        order = provider.create_qr_order(order_request())

        pay(sandbox, order.qr_content)

        record = sandbox.notifier.records[0]
        assert (record.attempts, record.delivered, record.last_status) == (2, True, 204)
        assert [r.content for r in sandbox.received] == [sandbox.received[0].content] * 2

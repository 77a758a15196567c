"""WechatPayProvider against the WeChat Pay emulator, through a real FastAPI app."""

import asyncio
import concurrent.futures
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import FastAPI

from roompay.domain.catalog import Wallet
from roompay.payments import crypto
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
from roompay.payments.errors import (
    ProviderRejectedError,
    ProviderSignatureError,
    ProviderUnavailableError,
    TradeAlreadyPaidError,
)
from roompay.payments.wechatpay import WechatPayConfig, WechatPayProvider, wire
from roompay.payments.wechatpay import constants as c
from roompay.sandbox.faults import FaultKind, Faults, RefundMode
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
    synchronous merchant client calls it through plain httpx. Like a network transport,
    it honours the request's read timeout: a late answer raises `httpx.ReadTimeout`,
    and the app's handler is abandoned (whatever it already did stays done).
    """

    def __init__(self, app: FastAPI, portal: BlockingPortal) -> None:
        self._asgi = httpx.ASGITransport(app=app)
        self._portal = portal

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        read_timeout = request.extensions.get("timeout", {}).get("read")
        future = self._portal.start_task_soon(self._send, request)
        try:
            return future.result(timeout=read_timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise httpx.ReadTimeout("no answer in time", request=request) from exc

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
    faults: Faults


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
    tmp_path: Path,
    merchant_key_pem: str,
    statuses: list[int],
    time_scale: float = 1.0,
    faults: Faults | None = None,
) -> Iterator[Sandbox]:
    clock = FakeClock()
    received: list[httpx.Request] = []
    notifier = Notifier(time_scale=time_scale, transport=receiver(received, statuses))
    faults = faults if faults is not None else Faults()
    emulator = WechatPayEmulator(tmp_path, clock, notifier, faults)
    with start_blocking_portal() as portal:
        transport = AppTransport(make_app(emulator), portal)
        with httpx.Client(transport=transport, base_url="http://testserver") as http:
            config = register(http, merchant_key_pem)
            yield Sandbox(emulator, http, transport, clock, config, notifier, received, faults)


@pytest.fixture
def sandbox(tmp_path: Path, merchant_key_pem: str) -> Iterator[Sandbox]:
    yield from build_sandbox(tmp_path, merchant_key_pem, statuses=[])


@pytest.fixture
def provider(sandbox: Sandbox) -> WechatPayProvider:
    return WechatPayProvider(sandbox.config, sandbox.clock, http_client=sandbox.http)


def order_request(
    out_trade_no: str = "T20250520000001",
    amount_fen: int = 800,
    expires_at: datetime = START + timedelta(minutes=5),
) -> QrOrderRequest:
    return QrOrderRequest(
        out_trade_no=out_trade_no,
        description="Dry 30 min",
        amount_fen=amount_fen,
        expires_at=expires_at,
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
    assert provider.query_trade("T20250520000001").state == TradeState.NOT_PAID


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
    assert provider.query_trade("T20250520000001").state == TradeState.NOT_FOUND


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
        provider.query_trade("T20250520000001")


# --- query and close --------------------------------------------------------------------


def test_querying_an_unknown_order_is_not_found(provider: WechatPayProvider) -> None:
    assert provider.query_trade("T20250520099999").state == TradeState.NOT_FOUND


def test_closing_an_unpaid_order_answers_204_then_it_is_closed(
    provider: WechatPayProvider,
) -> None:
    provider.create_qr_order(order_request())

    provider.client.close_order("T20250520000001")

    transaction = provider.client.query_order("T20250520000001")
    assert (transaction.trade_state, transaction.trade_state_desc) == ("CLOSED", "订单已关闭")
    provider.close_trade("T20250520000001")  # closing again is not an error for us


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
    assert provider.query_trade("T20250520000001").state == TradeState.SUCCESS


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
    provider.close_trade("T20250520000001")

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


# --- query_trade and close_trade --------------------------------------------------------

T1 = "T20250520000001"


def paid_order(
    sandbox: Sandbox, provider: WechatPayProvider, out_trade_no: str = T1, amount_fen: int = 800
) -> str:
    """Create an order, let the guest pay it now, and return its transaction_id."""
    expires_at = sandbox.clock.now() + timedelta(minutes=5)
    order = provider.create_qr_order(order_request(out_trade_no, amount_fen, expires_at))
    return pay(sandbox, order.qr_content)["transaction_id"]


def test_query_trade_tells_not_found_then_not_paid_then_success_with_the_payment(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    before = provider.query_trade(T1)
    provider.create_qr_order(order_request())
    unpaid = provider.query_trade(T1)
    sandbox.clock.current = START + timedelta(minutes=1)
    transaction_id = pay(sandbox, provider.create_qr_order(order_request()).qr_content)[
        "transaction_id"
    ]

    paid = provider.query_trade(T1)

    assert before == TradeSnapshot(T1, TradeState.NOT_FOUND, None, None, None)
    assert unpaid == TradeSnapshot(T1, TradeState.NOT_PAID, 800, None, None)
    assert paid == TradeSnapshot(
        T1, TradeState.SUCCESS, 800, transaction_id, START + timedelta(minutes=1)
    )
    assert paid.paid_at is not None
    assert paid.paid_at.tzinfo == UTC


def test_close_trade_is_idempotent_for_closed_and_unknown_trades(
    provider: WechatPayProvider,
) -> None:
    provider.create_qr_order(order_request())

    provider.close_trade(T1)
    provider.close_trade(T1)
    provider.close_trade("T20250520099999")

    assert provider.query_trade(T1).state == TradeState.CLOSED
    assert provider.query_trade("T20250520099999").state == TradeState.NOT_FOUND


def test_close_trade_after_payment_raises_trade_already_paid_and_changes_nothing(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    transaction_id = paid_order(sandbox, provider)

    with pytest.raises(TradeAlreadyPaidError) as caught:
        provider.close_trade(T1)

    assert (caught.value.code, caught.value.status) == ("ORDERPAID", 400)
    assert provider.query_trade(T1) == TradeSnapshot(
        T1, TradeState.SUCCESS, 800, transaction_id, START
    )


# --- refunds ----------------------------------------------------------------------------


def refund_request(
    refund_key: str, amount_fen: int, total_fen: int = 800, out_trade_no: str = T1
) -> RefundRequest:
    return RefundRequest(
        out_trade_no=out_trade_no,
        refund_key=refund_key,
        amount_fen=amount_fen,
        total_fen=total_fen,
        reason="The dryer did not start",
    )


def assert_refund_id_shape(outcome: RefundOutcome) -> str:
    refund_id = outcome.provider_refund_id
    assert refund_id is not None
    assert (len(refund_id), refund_id[:2], refund_id[12:20]) == (29, "50", "20250520")
    assert refund_id.isdigit()
    return refund_id


def test_a_full_refund_succeeds_at_once_and_the_trade_turns_refunded(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    transaction_id = paid_order(sandbox, provider)
    sandbox.clock.current = START + timedelta(minutes=3)

    outcome = provider.refund(refund_request("R20250520000001", 800))

    refund_id = assert_refund_id_shape(outcome)
    assert outcome == RefundOutcome("R20250520000001", RefundState.SUCCESS, 800, refund_id)
    assert provider.query_refund(T1, "R20250520000001") == outcome
    assert provider.query_trade(T1) == TradeSnapshot(
        T1, TradeState.REFUNDED, 800, transaction_id, START
    )
    refund = provider.client.query_refund("R20250520000001")
    assert (refund.status, refund.success_time, refund.create_time) == (
        "SUCCESS",
        START + timedelta(minutes=3),
        START + timedelta(minutes=3),
    )
    assert (refund.amount.total, refund.amount.refund, refund.transaction_id) == (
        800,
        800,
        transaction_id,
    )


def test_partial_refunds_add_up_to_the_total_and_no_further(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    paid_order(sandbox, provider)

    first = provider.refund(refund_request("R1", 300))
    second = provider.refund(refund_request("R2", 500))
    with pytest.raises(ProviderRejectedError) as caught:
        provider.refund(refund_request("R3", 1))

    assert (first.state, first.amount_fen, second.state, second.amount_fen) == (
        RefundState.SUCCESS,
        300,
        RefundState.SUCCESS,
        500,
    )
    assert (caught.value.code, caught.value.status) == ("NOT_ENOUGH", 403)
    assert provider.query_refund(T1, "R3") == RefundOutcome("R3", RefundState.NOT_FOUND, 0, None)


def test_the_same_refund_key_twice_refunds_once(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    paid_order(sandbox, provider)

    first = provider.refund(refund_request("R1", 500))
    again = provider.refund(refund_request("R1", 500))

    assert again == first
    # Were it counted twice, nothing would be left; 300 fen are.
    with pytest.raises(ProviderRejectedError, match="NOT_ENOUGH"):
        provider.refund(refund_request("R2", 301))
    assert provider.refund(refund_request("R2", 300)).state == RefundState.SUCCESS


def test_the_same_refund_key_with_another_amount_is_invalid_request(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    paid_order(sandbox, provider)
    provider.refund(refund_request("R1", 500))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.refund(refund_request("R1", 400))

    assert (caught.value.code, caught.value.status) == ("INVALID_REQUEST", 400)


def test_refunding_more_than_the_total_is_not_enough_and_refunds_nothing(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    paid_order(sandbox, provider)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.refund(refund_request("R1", 801))

    assert (caught.value.code, caught.value.status) == ("NOT_ENOUGH", 403)
    assert provider.query_refund(T1, "R1").state == RefundState.NOT_FOUND
    assert provider.query_trade(T1).state == TradeState.SUCCESS


@pytest.mark.parametrize(
    ("request_", "code", "status"),
    [
        (refund_request("R1", 100, out_trade_no="T20250520099999"), "RESOURCE_NOT_EXISTS", 404),
        (refund_request("R1", 100, total_fen=900), "PARAM_ERROR", 400),
        (refund_request("R 1", 100), "PARAM_ERROR", 400),
        (refund_request("R" * 65, 100), "PARAM_ERROR", 400),
        (refund_request("R1", 0), "PARAM_ERROR", 400),
    ],
)
def test_an_invalid_refund_is_rejected(
    sandbox: Sandbox,
    provider: WechatPayProvider,
    request_: RefundRequest,
    code: str,
    status: int,
) -> None:
    paid_order(sandbox, provider)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.refund(request_)

    assert (caught.value.code, caught.value.status) == (code, status)
    assert provider.query_trade(T1).state == TradeState.SUCCESS


def test_refunding_an_unpaid_trade_is_invalid_request(provider: WechatPayProvider) -> None:
    provider.create_qr_order(order_request())

    with pytest.raises(ProviderRejectedError) as caught:
        provider.refund(refund_request("R1", 800))

    assert (caught.value.code, caught.value.message, caught.value.status) == (
        "INVALID_REQUEST",
        "trade not paid",
        400,
    )


def test_a_processing_refund_succeeds_after_the_configured_number_of_queries(
    tmp_path: Path, merchant_key_pem: str
) -> None:
    faults = Faults(processing_queries=2)
    faults.refund_mode["wechatpay"] = RefundMode.PROCESSING
    for sandbox in build_sandbox(tmp_path, merchant_key_pem, statuses=[], faults=faults):
        provider = WechatPayProvider(sandbox.config, sandbox.clock, http_client=sandbox.http)
        paid_order(sandbox, provider)

        accepted = provider.refund(refund_request("R1", 800))
        trade_while_processing = provider.query_trade(T1).state
        sandbox.clock.current = START + timedelta(minutes=1)
        first_query = provider.query_refund(T1, "R1")
        sandbox.clock.current = START + timedelta(minutes=2)
        second_query = provider.query_refund(T1, "R1")
        third_query = provider.query_refund(T1, "R1")

        assert (accepted.state, trade_while_processing) == (
            RefundState.PROCESSING,
            TradeState.SUCCESS,
        )
        assert (first_query.state, second_query.state, third_query.state) == (
            RefundState.PROCESSING,
            RefundState.SUCCESS,
            RefundState.SUCCESS,
        )
        assert second_query == third_query
        assert second_query.provider_refund_id == accepted.provider_refund_id
        assert provider.query_trade(T1).state == TradeState.REFUNDED
        assert provider.client.query_refund("R1").success_time == START + timedelta(minutes=2)


def test_an_abnormal_refund_stays_abnormal_and_the_trade_stays_paid(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    sandbox.faults.refund_mode["wechatpay"] = RefundMode.ABNORMAL
    paid_order(sandbox, provider)

    accepted = provider.refund(refund_request("R1", 800))
    queried = provider.query_refund(T1, "R1")

    assert (accepted.state, queried) == (RefundState.ABNORMAL, accepted)
    assert provider.query_trade(T1).state == TradeState.SUCCESS
    # No refund line in the bill for money that did not go back.
    assert [entry.kind for entry in provider.fetch_bill(START.date())] == [BillEntryKind.PAYMENT]


# --- faults -------------------------------------------------------------------------------


class Recorder(httpx.BaseTransport):
    """Pass requests to the sandbox and keep each raw answer."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner
        self.responses: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self._inner.handle_request(request)
        self.responses.append(response)
        return response


def test_a_system_error_is_a_signed_500_and_a_bare_500_is_unsigned(
    sandbox: Sandbox,
) -> None:
    recorder = Recorder(sandbox.transport)
    provider = WechatPayProvider(sandbox.config, sandbox.clock, transport=recorder)
    sandbox.faults.arm("wechatpay", "query", FaultKind.SYSTEM_ERROR)
    sandbox.faults.arm("wechatpay", "query", FaultKind.HTTP_500)

    with pytest.raises(ProviderUnavailableError, match="HTTP 500"):
        provider.query_trade(T1)
    with pytest.raises(ProviderUnavailableError, match="HTTP 500"):
        provider.query_trade(T1)
    provider.close()

    system_error, bare = recorder.responses
    assert (system_error.status_code, system_error.json()) == (
        500,
        {"code": "SYSTEM_ERROR", "message": "系统错误"},
    )
    platform_key = crypto.load_public_key(sandbox.config.platform_public_key_pem)
    wire.verify_platform_signature(
        wire.lower_keys(system_error.headers),
        system_error.content,
        {sandbox.config.platform_public_key_id: platform_key},
        sandbox.clock.now(),
    )
    assert (bare.status_code, bare.text) == (500, "Internal Server Error")
    assert "wechatpay-signature" not in bare.headers


@pytest.mark.parametrize("kind", [FaultKind.SYSTEM_ERROR, FaultKind.HTTP_500])
def test_a_failed_order_creation_created_nothing(
    sandbox: Sandbox, provider: WechatPayProvider, kind: FaultKind
) -> None:
    sandbox.faults.arm("wechatpay", "native", kind)

    with pytest.raises(ProviderUnavailableError):
        provider.create_qr_order(order_request())

    assert provider.query_trade(T1).state == TradeState.NOT_FOUND


@pytest.mark.parametrize("kind", [FaultKind.SYSTEM_ERROR, FaultKind.HTTP_500])
def test_a_failed_close_closed_nothing(
    sandbox: Sandbox, provider: WechatPayProvider, kind: FaultKind
) -> None:
    provider.create_qr_order(order_request())
    sandbox.faults.arm("wechatpay", "close", kind)

    with pytest.raises(ProviderUnavailableError):
        provider.close_trade(T1)

    assert provider.query_trade(T1).state == TradeState.NOT_PAID


@pytest.mark.parametrize("kind", [FaultKind.SYSTEM_ERROR, FaultKind.HTTP_500])
def test_a_failed_refund_refunded_nothing_and_the_same_key_then_works(
    sandbox: Sandbox, provider: WechatPayProvider, kind: FaultKind
) -> None:
    paid_order(sandbox, provider)
    sandbox.faults.arm("wechatpay", "refund", kind)

    with pytest.raises(ProviderUnavailableError):
        provider.refund(refund_request("R1", 800))
    not_yet = provider.query_refund(T1, "R1")
    retried = provider.refund(refund_request("R1", 800))

    assert not_yet == RefundOutcome("R1", RefundState.NOT_FOUND, 0, None)
    assert (retried.state, retried.amount_fen) == (RefundState.SUCCESS, 800)


@pytest.mark.parametrize(
    ("operation", "call"),
    [
        ("refund_query", lambda provider: provider.query_refund(T1, "R1")),
        ("tradebill", lambda provider: provider.fetch_bill(START.date())),
    ],
)
@pytest.mark.parametrize("kind", [FaultKind.SYSTEM_ERROR, FaultKind.HTTP_500])
def test_failed_reads_are_unavailable(
    sandbox: Sandbox,
    provider: WechatPayProvider,
    kind: FaultKind,
    operation: str,
    call: Callable[[WechatPayProvider], object],
) -> None:
    paid_order(sandbox, provider)
    provider.refund(refund_request("R1", 800))
    sandbox.faults.arm("wechatpay", operation, kind)

    with pytest.raises(ProviderUnavailableError):
        call(provider)

    assert provider.query_refund(T1, "R1").state == RefundState.SUCCESS  # the fault is used up


def test_a_slow_refund_times_out_and_the_retry_with_the_same_key_refunds_once(
    tmp_path: Path, merchant_key_pem: str
) -> None:
    faults = Faults(slow_s=1.0)
    for sandbox in build_sandbox(tmp_path, merchant_key_pem, statuses=[], faults=faults):
        provider = WechatPayProvider(
            sandbox.config, sandbox.clock, http_client=sandbox.http, timeout_s=0.2
        )
        paid_order(sandbox, provider)
        faults.arm("wechatpay", "refund", FaultKind.SLOW)

        with pytest.raises(ProviderUnavailableError, match="ReadTimeout"):
            provider.refund(refund_request("R1", 500))
        retried = provider.refund(refund_request("R1", 500))

        assert (retried.state, retried.amount_fen) == (RefundState.SUCCESS, 500)
        assert provider.query_refund(T1, "R1") == retried
        # 500 of 800 refunded once: 300 are left, not 0 and not 800.
        with pytest.raises(ProviderRejectedError, match="NOT_ENOUGH"):
            provider.refund(refund_request("R2", 301))
        assert provider.refund(refund_request("R2", 300)).state == RefundState.SUCCESS


def test_a_slow_order_creation_times_out_and_the_retry_returns_the_same_code_url(
    tmp_path: Path, merchant_key_pem: str
) -> None:
    faults = Faults(slow_s=1.0)
    for sandbox in build_sandbox(tmp_path, merchant_key_pem, statuses=[], faults=faults):
        provider = WechatPayProvider(
            sandbox.config, sandbox.clock, http_client=sandbox.http, timeout_s=0.2
        )
        faults.arm("wechatpay", "native", FaultKind.SLOW)

        with pytest.raises(ProviderUnavailableError, match="ReadTimeout"):
            provider.create_qr_order(order_request())
        retried = provider.create_qr_order(order_request())

        assert sandbox.emulator.owns_qr(retried.qr_content) is True
        assert provider.query_trade(T1).state == TradeState.NOT_PAID


# --- the trade bill -----------------------------------------------------------------------


def test_the_bill_of_a_day_lists_its_payments_and_refunds_exactly(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    sandbox.clock.current = START + timedelta(minutes=1)
    first = paid_order(sandbox, provider, T1, 800)
    sandbox.clock.current = START + timedelta(minutes=2)
    second = paid_order(sandbox, provider, "T20250520000002", 500)
    sandbox.clock.current = START + timedelta(minutes=10)
    refund = provider.refund(refund_request("R20250520000001", 300))
    sandbox.clock.current = START + timedelta(days=1)
    paid_order(sandbox, provider, "T20250521000001", 100)  # the next day's bill

    entries = provider.fetch_bill(START.date())

    assert entries == [
        BillEntry(BillEntryKind.PAYMENT, T1, first, None, 800, 5, START + timedelta(minutes=1)),
        BillEntry(
            BillEntryKind.PAYMENT,
            "T20250520000002",
            second,
            None,
            500,
            3,
            START + timedelta(minutes=2),
        ),
        BillEntry(
            BillEntryKind.REFUND,
            T1,
            first,
            "R20250520000001",
            300,
            -2,
            START + timedelta(minutes=10),
        ),
    ]
    bill = provider.client.trade_bill(START.date())
    lines = provider.client.download_bill(bill).decode().split("\r\n")
    assert lines[0] == ",".join(c.TRADE_BILL_ALL_COLUMNS)
    assert lines[3].split(",`")[13:20] == [
        "0.00",  # 代金券金额
        refund.provider_refund_id,
        "R20250520000001",
        "3.00",
        "0.00",
        "ORIGINAL",
        "SUCCESS",
    ]
    assert lines[4:] == [
        "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额",
        "`3,`13.00,`3.00,`0.00,`0.06,`13.00,`3.00",
        "",
    ]


def test_a_day_without_trades_has_no_bill(sandbox: Sandbox, provider: WechatPayProvider) -> None:
    paid_order(sandbox, provider)

    with pytest.raises(ProviderRejectedError) as caught:
        provider.client.trade_bill(START.date() - timedelta(days=1))

    assert (caught.value.code, caught.value.status) == ("NO_STATEMENT_EXIST", 400)
    assert provider.fetch_bill(START.date() - timedelta(days=1)) == []


def test_a_bill_download_with_an_unknown_token_is_invalid_request(
    provider: WechatPayProvider,
) -> None:
    bill = wire.TradeBillResponse(
        hash_type="SHA1",
        hash_value="0" * 40,
        download_url=f"{BASE_URL}/v3/billdownload/file?token=unknown",
    )

    with pytest.raises(ProviderRejectedError) as caught:
        provider.client.download_bill(bill)

    assert (caught.value.code, caught.value.status) == ("INVALID_REQUEST", 400)


def test_the_download_url_is_absolute_under_the_gateway_base(
    sandbox: Sandbox, provider: WechatPayProvider
) -> None:
    paid_order(sandbox, provider)

    bill = provider.client.trade_bill(START.date())

    assert bill.download_url.startswith(f"{BASE_URL}/v3/billdownload/file?token=")
    assert bill.hash_type == "SHA1"

"""WeChat Pay API v3 wire rules: signed messages, AEAD, notify and response checks."""

import base64
import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from roompay.payments import crypto
from roompay.payments.base import (
    BillEntry,
    BillEntryKind,
    NotifyReply,
    QrOrderRequest,
    RefundOutcome,
    RefundRequest,
    RefundState,
    TradeSnapshot,
    TradeState,
)
from roompay.payments.errors import (
    NotificationRejectedError,
    ProviderRejectedError,
    ProviderSignatureError,
    ProviderUnavailableError,
    TradeAlreadyPaidError,
)
from roompay.payments.wechatpay import WechatPayConfig, WechatPayProvider, wire
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay.adapter import bill_entries, refund_state, rfc3339_cst, trade_state

NOW = datetime(2025, 5, 20, 5, 29, 35, tzinfo=UTC)
NOW_TS = str(int(NOW.timestamp()))
APIV3_KEY = "0123456789abcdefghijABCDEFGHIJ01"
PUBLIC_KEY_ID = "PUB_KEY_ID_0114232134912410000000000000"
MCHID = "1900000001"
APPID = "wxd678efh567hg6787"
NONCE = "593BEC0C930BF1AFEB40B4A08C8FB242"


@dataclass
class FixedClock:
    current: datetime = NOW

    def now(self) -> datetime:
        return self.current


@dataclass(frozen=True)
class Keys:
    merchant: rsa.RSAPrivateKey
    platform: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(merchant=crypto.generate_private_key(), platform=crypto.generate_private_key())


@pytest.fixture
def config(keys: Keys) -> WechatPayConfig:
    return WechatPayConfig(
        mchid=MCHID,
        appid=APPID,
        merchant_serial_no="5157F09EFDC096DE15EBE81A47057A7232F1B8E1",
        merchant_private_key_pem=crypto.private_key_pem(keys.merchant),
        apiv3_key=APIV3_KEY,
        platform_public_key_pem=crypto.public_key_pem(keys.platform),
        platform_public_key_id=PUBLIC_KEY_ID,
        base_url="https://gateway.test/sandbox/wechatpay",
    )


@pytest.fixture
def provider(config: WechatPayConfig) -> WechatPayProvider:
    return WechatPayProvider(config, FixedClock())


# --- signed messages --------------------------------------------------------------------


def test_the_request_message_is_method_url_timestamp_nonce_body_each_ending_in_newline() -> None:
    message = wire.request_message(
        "post", "/v3/pay/transactions/native", "1554208460", NONCE, b'{"amount":{"total":1}}'
    )

    assert message == (
        b"POST\n/v3/pay/transactions/native\n1554208460\n"
        b'593BEC0C930BF1AFEB40B4A08C8FB242\n{"amount":{"total":1}}\n'
    )


def test_a_get_request_message_keeps_the_empty_body_line() -> None:
    message = wire.request_message(
        "GET", "/v3/pay/transactions/out-trade-no/T1?mchid=1900000001", "1554208460", NONCE, b""
    )

    assert message == (
        b"GET\n/v3/pay/transactions/out-trade-no/T1?mchid=1900000001\n1554208460\n"
        b"593BEC0C930BF1AFEB40B4A08C8FB242\n\n"
    )


def test_the_response_message_of_a_204_has_an_empty_body_line() -> None:
    assert wire.response_message("1554208460", NONCE, b"") == (
        b"1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n\n"
    )


@pytest.mark.parametrize(
    ("raw_path", "query", "expected"),
    [
        ("/v3/pay/transactions/native", "", "/v3/pay/transactions/native"),
        ("/sandbox/wechatpay/v3/pay/transactions/native", "", "/v3/pay/transactions/native"),
        (
            "/sandbox/wechatpay/v3/pay/transactions/out-trade-no/T*1",
            "mchid=1900000001",
            "/v3/pay/transactions/out-trade-no/T*1?mchid=1900000001",
        ),
    ],
)
def test_the_canonical_url_is_the_path_from_v3_on_plus_the_query(
    raw_path: str, query: str, expected: str
) -> None:
    assert wire.canonical_url(raw_path, query) == expected


def test_a_path_without_v3_has_no_canonical_url() -> None:
    with pytest.raises(wire.WireError, match="not an API v3 path"):
        wire.canonical_url("/sandbox/wechatpay/merchants", "")


# --- the Authorization header -------------------------------------------------------------

AUTH = wire.Authorization(
    mchid=MCHID, nonce_str=NONCE, signature="c2ln", timestamp="1554208460", serial_no="ABC1"
)


def test_the_authorization_header_lists_the_pairs_in_the_documented_order() -> None:
    assert AUTH.header_value() == (
        'WECHATPAY2-SHA256-RSA2048 mchid="1900000001",'
        'nonce_str="593BEC0C930BF1AFEB40B4A08C8FB242",signature="c2ln",'
        'timestamp="1554208460",serial_no="ABC1"'
    )


def test_the_authorization_pairs_may_come_in_any_order() -> None:
    value = (
        'WECHATPAY2-SHA256-RSA2048 serial_no="ABC1", timestamp="1554208460",'
        'signature="c2ln",nonce_str="593BEC0C930BF1AFEB40B4A08C8FB242",mchid="1900000001"'
    )

    assert wire.parse_authorization(value) == AUTH


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('Bearer mchid="1"', "unsupported authorization scheme 'Bearer'"),
        (
            'WECHATPAY2-SHA256-RSA2048 mchid="1",mchid="2"',
            "authorization parameter 'mchid' repeated",
        ),
        ("WECHATPAY2-SHA256-RSA2048 mchid=1", "malformed authorization parameters"),
        (
            'WECHATPAY2-SHA256-RSA2048 mchid="1",nonce_str="n"',
            "authorization lacks signature, timestamp, serial_no",
        ),
    ],
)
def test_a_malformed_authorization_header_is_refused(value: str, error: str) -> None:
    with pytest.raises(wire.WireError) as caught:
        wire.parse_authorization(value)

    assert str(caught.value) == error


# --- AEAD_AES_256_GCM ---------------------------------------------------------------------


def test_a_resource_decrypts_to_what_was_encrypted() -> None:
    plaintext = '{"out_trade_no":"T1","summary":"支付成功"}'.encode()

    ciphertext = wire.encrypt_resource(APIV3_KEY, "fdasflkja484", "transaction", plaintext)

    assert len(base64.b64decode(ciphertext)) == len(plaintext) + 16  # ciphertext || tag
    assert wire.decrypt_resource(APIV3_KEY, "fdasflkja484", "transaction", ciphertext) == plaintext


@pytest.mark.parametrize(
    ("key", "nonce", "aad"),
    [
        ("X123456789abcdefghijABCDEFGHIJ01", "fdasflkja484", "transaction"),
        (APIV3_KEY, "fdasflkja485", "transaction"),
        (APIV3_KEY, "fdasflkja484", "refund"),
    ],
)
def test_a_resource_does_not_decrypt_with_another_key_nonce_or_aad(
    key: str, nonce: str, aad: str
) -> None:
    ciphertext = wire.encrypt_resource(APIV3_KEY, "fdasflkja484", "transaction", b"{}")

    with pytest.raises(wire.WireError, match="ciphertext does not authenticate"):
        wire.decrypt_resource(key, nonce, aad, ciphertext)


def test_an_apiv3_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(wire.WireError, match="the APIv3 key must be 32 bytes"):
        wire.encrypt_resource("short", "fdasflkja484", "transaction", b"{}")


# --- payment notifies ---------------------------------------------------------------------


def transaction(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "appid": APPID,
        "mchid": MCHID,
        "out_trade_no": "T20250520000001",
        "transaction_id": "4200000123202505201234567890",
        "trade_type": "NATIVE",
        "trade_state": "SUCCESS",
        "trade_state_desc": "支付成功",
        "bank_type": "OTHERS",
        "attach": "",
        "success_time": "2025-05-20T13:29:35+08:00",
        "payer": {"openid": "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"},
        "amount": {"total": 800, "payer_total": 800, "currency": "CNY", "payer_currency": "CNY"},
    }
    return data | changes


def notify_body(resource: dict[str, Any], ciphertext: str | None = None) -> bytes:
    plaintext = json.dumps(resource, ensure_ascii=False).encode()
    sealed = wire.encrypt_resource(APIV3_KEY, "fdasflkja484", "transaction", plaintext)
    envelope = {
        "id": "EV-2018022511223320873",
        "create_time": "2025-05-20T13:29:35+08:00",
        "resource_type": "encrypt-resource",
        "event_type": "TRANSACTION.SUCCESS",
        "summary": "支付成功",
        "resource": {
            "original_type": "transaction",
            "algorithm": "AEAD_AES_256_GCM",
            "ciphertext": sealed if ciphertext is None else ciphertext,
            "associated_data": "transaction",
            "nonce": "fdasflkja484",
        },
    }
    return json.dumps(envelope, ensure_ascii=False).encode()


def signed_headers(key: rsa.RSAPrivateKey, body: bytes, timestamp: str = NOW_TS) -> dict[str, str]:
    return wire.platform_signature_headers(key, PUBLIC_KEY_ID, timestamp, NONCE, body)


def test_a_genuine_notify_becomes_a_payment_notification(
    keys: Keys, provider: WechatPayProvider
) -> None:
    body = notify_body(transaction())
    headers = {name.upper(): value for name, value in signed_headers(keys.platform, body).items()}

    notification = provider.parse_notification(headers, body, NOW)

    assert notification.out_trade_no == "T20250520000001"
    assert notification.provider_trade_no == "4200000123202505201234567890"
    assert notification.state == TradeState.SUCCESS
    assert notification.amount_fen == 800
    assert notification.paid_at == NOW
    assert notification.notification_id == "EV-2018022511223320873"
    assert notification.merchant_ok is True


@pytest.mark.parametrize(
    ("wire_state", "state"),
    [
        ("NOTPAY", TradeState.NOT_PAID),
        ("CLOSED", TradeState.CLOSED),
        ("REVOKED", TradeState.CLOSED),
        ("PAYERROR", TradeState.CLOSED),
        ("REFUND", TradeState.REFUNDED),
    ],
)
def test_trade_states_map_to_ours(
    keys: Keys, provider: WechatPayProvider, wire_state: str, state: TradeState
) -> None:
    body = notify_body(transaction(trade_state=wire_state))

    notification = provider.parse_notification(signed_headers(keys.platform, body), body, NOW)

    assert notification.state == state


@pytest.mark.parametrize("changes", [{"mchid": "1900000002"}, {"appid": "wx0000000000000000"}])
def test_a_notify_for_another_merchant_is_authentic_but_not_ours(
    keys: Keys, provider: WechatPayProvider, changes: dict[str, str]
) -> None:
    body = notify_body(transaction(**changes))

    notification = provider.parse_notification(signed_headers(keys.platform, body), body, NOW)

    assert notification.merchant_ok is False


@pytest.mark.parametrize("skew_s", [-300, -299, 299, 300])
def test_a_notify_up_to_300_s_off_is_accepted(
    keys: Keys, provider: WechatPayProvider, skew_s: int
) -> None:
    body = notify_body(transaction())
    headers = signed_headers(keys.platform, body, timestamp=str(int(NOW_TS) + skew_s))

    assert provider.parse_notification(headers, body, NOW).amount_fen == 800


Tamper = Callable[[Keys, bytes, dict[str, str]], tuple[dict[str, str], bytes]]


def _set(name: str, value: str) -> Tamper:
    return lambda _keys, body, headers: ({**headers, name: value}, body)


def _stale(skew_s: int) -> Tamper:
    def tamper(keys: Keys, body: bytes, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
        return signed_headers(keys.platform, body, timestamp=str(int(NOW_TS) + skew_s)), body

    return tamper


def _signed_by_merchant(
    keys: Keys, body: bytes, headers: dict[str, str]
) -> tuple[dict[str, str], bytes]:
    del headers
    return signed_headers(keys.merchant, body), body


def _altered_body(keys: Keys, body: bytes, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    del keys
    return headers, body.replace(b"TRANSACTION.SUCCESS", b"TRANSACTION.SUCCESZ")


def _bad_ciphertext(
    keys: Keys, body: bytes, headers: dict[str, str]
) -> tuple[dict[str, str], bytes]:
    del body, headers
    forged = notify_body(transaction(), ciphertext=base64.b64encode(b"\x00" * 40).decode())
    return signed_headers(keys.platform, forged), forged


def _not_base64(keys: Keys, body: bytes, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    del body, headers
    forged = notify_body(transaction(), ciphertext="not base64!")
    return signed_headers(keys.platform, forged), forged


def _missing(name: str) -> Tamper:
    return lambda _keys, body, headers: ({k: v for k, v in headers.items() if k != name}, body)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_signed_by_merchant, "platform signature does not verify"),
        (
            _set("Wechatpay-Signature", base64.b64encode(b"x" * 256).decode()),
            "platform signature does not verify",
        ),
        (_altered_body, "platform signature does not verify"),
        (_set("Wechatpay-Signature", "WECHATPAY/SIGNTEST/abc"), "signature probe"),
        (_stale(-301), "is 301 s away from now"),
        (_stale(301), "is 301 s away from now"),
        (_set("Wechatpay-Timestamp", "soon"), "malformed timestamp 'soon'"),
        (
            _set("Wechatpay-Serial", "PUB_KEY_ID_0000000000000000000000000000"),
            "unknown platform key serial",
        ),
        (_set("Wechatpay-Signature-Type", "WECHATPAY2-SM2-WITH-SM3"), "unsupported signature type"),
        (_missing("Wechatpay-Signature-Type"), "missing header Wechatpay-Signature-Type"),
        (_missing("Wechatpay-Nonce"), "missing header Wechatpay-Nonce"),
        (_bad_ciphertext, "ciphertext does not authenticate"),
        (_not_base64, "ciphertext is not base64"),
    ],
)
def test_a_forged_stale_or_broken_notify_is_rejected(
    keys: Keys, provider: WechatPayProvider, tamper: Tamper, reason: str
) -> None:
    body = notify_body(transaction())
    headers, body = tamper(keys, body, signed_headers(keys.platform, body))

    with pytest.raises(NotificationRejectedError, match=reason):
        provider.parse_notification(headers, body, NOW)


def test_a_notify_decrypted_with_another_apiv3_key_is_rejected(
    keys: Keys, config: WechatPayConfig
) -> None:
    provider = WechatPayProvider(replace(config, apiv3_key="Z" * 32), FixedClock())
    body = notify_body(transaction())

    with pytest.raises(NotificationRejectedError, match="ciphertext does not authenticate"):
        provider.parse_notification(signed_headers(keys.platform, body), body, NOW)


def test_a_decrypted_resource_that_is_no_transaction_is_rejected(
    keys: Keys, provider: WechatPayProvider
) -> None:
    body = notify_body({"mchid": MCHID})

    with pytest.raises(NotificationRejectedError, match="malformed transaction"):
        provider.parse_notification(signed_headers(keys.platform, body), body, NOW)


def test_the_replies_are_204_empty_and_500_fail(provider: WechatPayProvider) -> None:
    assert provider.reply_ok() == NotifyReply(204, b"", "application/json")
    assert provider.reply_fail("db down") == NotifyReply(
        500, b'{"code": "FAIL", "message": "db down"}', "application/json"
    )


# --- the client: what it sends and how it reads answers -----------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def gateway(
    keys: Keys, status: int, answer: dict[str, Any] | None, seen: list[httpx.Request]
) -> Handler:
    """A gateway that records each request and answers with a platform-signed response."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = b"" if answer is None else json.dumps(answer).encode()
        return httpx.Response(status, headers=signed_headers(keys.platform, body), content=body)

    return handle


def provider_on(config: WechatPayConfig, handler: Handler) -> WechatPayProvider:
    return WechatPayProvider(config, FixedClock(), transport=httpx.MockTransport(handler))


def qr_request(description: str = "Dry 30 min") -> QrOrderRequest:
    return QrOrderRequest(
        out_trade_no="T20250520000001",
        description=description,
        amount_fen=800,
        expires_at=NOW + timedelta(minutes=5),
        notify_url="https://hotel.test/api/v1/notify/wechatpay",
    )


def test_an_order_request_is_signed_over_the_path_below_the_base_url(
    keys: Keys, config: WechatPayConfig
) -> None:
    seen: list[httpx.Request] = []
    answer = {"code_url": "weixin://wxpay/bizpayurl?pr=abc"}
    provider = provider_on(config, gateway(keys, 200, answer, seen))

    order = provider.create_qr_order(qr_request("洗" * 130))

    assert order.qr_content == "weixin://wxpay/bizpayurl?pr=abc"
    request = seen[0]
    assert str(request.url) == "https://gateway.test/sandbox/wechatpay/v3/pay/transactions/native"
    assert request.headers["Wechatpay-Serial"] == PUBLIC_KEY_ID
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == {
        "appid": APPID,
        "mchid": MCHID,
        "description": "洗" * 127,
        "out_trade_no": "T20250520000001",
        "time_expire": "2025-05-20T13:34:35+08:00",
        "notify_url": "https://hotel.test/api/v1/notify/wechatpay",
        "amount": {"total": 800, "currency": "CNY"},
    }
    auth = wire.parse_authorization(request.headers["Authorization"])
    assert (auth.mchid, auth.serial_no, auth.timestamp) == (
        MCHID,
        config.merchant_serial_no,
        NOW_TS,
    )
    message = wire.request_message(
        "POST", "/v3/pay/transactions/native", auth.timestamp, auth.nonce_str, request.content
    )
    assert crypto.verify_b64(keys.merchant.public_key(), message, auth.signature) is True


def test_a_query_signs_its_query_string(keys: Keys, config: WechatPayConfig) -> None:
    seen: list[httpx.Request] = []
    provider = provider_on(config, gateway(keys, 200, transaction(), seen))

    assert provider.query_trade("T20250520000001").state == TradeState.SUCCESS

    auth = wire.parse_authorization(seen[0].headers["Authorization"])
    message = wire.request_message(
        "GET",
        "/v3/pay/transactions/out-trade-no/T20250520000001?mchid=1900000001",
        auth.timestamp,
        auth.nonce_str,
        b"",
    )
    assert crypto.verify_b64(keys.merchant.public_key(), message, auth.signature) is True


def test_a_close_answered_with_a_signed_204_succeeds(keys: Keys, config: WechatPayConfig) -> None:
    seen: list[httpx.Request] = []
    provider = provider_on(config, gateway(keys, 204, None, seen))

    provider.client.close_order("T20250520000001")

    assert (
        seen[0].url.path
        == "/sandbox/wechatpay/v3/pay/transactions/out-trade-no/T20250520000001/close"
    )
    assert seen[0].content == b'{"mchid":"1900000001"}'


def test_a_signed_4xx_is_a_rejection_with_the_providers_code(
    keys: Keys, config: WechatPayConfig
) -> None:
    error = {"code": "PARAM_ERROR", "message": "参数错误", "detail": {"field": "amount"}}
    provider = provider_on(config, gateway(keys, 400, error, []))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.create_qr_order(qr_request())

    assert (caught.value.code, caught.value.message, caught.value.status) == (
        "PARAM_ERROR",
        "参数错误",
        400,
    )


def _raise(exc: Exception) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return handle


@pytest.mark.parametrize(
    "handler",
    [
        lambda _request: httpx.Response(500, json={"code": "SYSTEM_ERROR", "message": "busy"}),
        lambda _request: httpx.Response(502, text="bad gateway"),
        _raise(httpx.ConnectError("refused")),
        _raise(httpx.ReadTimeout("slow")),
    ],
)
def test_5xx_network_failures_and_timeouts_are_unavailable(
    config: WechatPayConfig, handler: Handler
) -> None:
    with pytest.raises(ProviderUnavailableError):
        provider_on(config, handler).create_qr_order(qr_request())


def test_a_signed_2xx_with_an_unexpected_body_is_unavailable(
    keys: Keys, config: WechatPayConfig
) -> None:
    provider = provider_on(config, gateway(keys, 200, {"prepay_id": "x"}, []))

    with pytest.raises(ProviderUnavailableError, match="malformed NativeOrderResponse"):
        provider.create_qr_order(qr_request())


@pytest.mark.parametrize("status", [200, 400])
def test_an_unsigned_answer_is_never_trusted(config: WechatPayConfig, status: int) -> None:
    provider = provider_on(
        config, lambda _request: httpx.Response(status, json={"code_url": "weixin://x"})
    )

    with pytest.raises(ProviderSignatureError, match="missing header Wechatpay-Signature-Type"):
        provider.create_qr_order(qr_request())


def test_an_answer_without_the_signature_type_is_refused(
    keys: Keys, config: WechatPayConfig
) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        body = b'{"code_url":"weixin://wxpay/bizpayurl?pr=abc"}'
        headers = signed_headers(keys.platform, body)
        del headers["Wechatpay-Signature-Type"]
        return httpx.Response(200, headers=headers, content=body)

    with pytest.raises(ProviderSignatureError, match="missing header Wechatpay-Signature-Type"):
        provider_on(config, handle).create_qr_order(qr_request())


def test_time_expire_is_rfc3339_in_china_standard_time() -> None:
    assert rfc3339_cst(datetime(2025, 5, 20, 5, 29, 35, 999, tzinfo=UTC)) == (
        "2025-05-20T13:29:35+08:00"
    )
    with pytest.raises(ValueError, match="naive"):
        rfc3339_cst(datetime(2025, 5, 20, 5, 29, 35))  # noqa: DTZ001 - the naive case under test


# --- query, close and refunds: what the provider sends and how it maps answers -----------


def test_query_trade_maps_a_paid_transaction_to_a_snapshot(
    keys: Keys, config: WechatPayConfig
) -> None:
    provider = provider_on(config, gateway(keys, 200, transaction(), []))

    assert provider.query_trade("T20250520000001") == TradeSnapshot(
        out_trade_no="T20250520000001",
        state=TradeState.SUCCESS,
        amount_fen=800,
        provider_trade_no="4200000123202505201234567890",
        paid_at=NOW,
    )


def test_query_trade_of_an_unknown_trade_is_not_found(keys: Keys, config: WechatPayConfig) -> None:
    error = {"code": "ORDER_NOT_EXIST", "message": "订单不存在"}
    provider = provider_on(config, gateway(keys, 404, error, []))

    assert provider.query_trade("T20250520000001") == TradeSnapshot(
        "T20250520000001", TradeState.NOT_FOUND, None, None, None
    )


@pytest.mark.parametrize(("status", "code"), [(400, "ORDER_CLOSED"), (404, "ORDER_NOT_EXIST")])
def test_close_trade_of_a_closed_or_unknown_trade_is_fine(
    keys: Keys, config: WechatPayConfig, status: int, code: str
) -> None:
    provider = provider_on(config, gateway(keys, status, {"code": code, "message": "x"}, []))

    provider.close_trade("T20250520000001")


def test_close_trade_of_a_paid_trade_raises_trade_already_paid(
    keys: Keys, config: WechatPayConfig
) -> None:
    error = {"code": "ORDERPAID", "message": "订单已支付"}
    provider = provider_on(config, gateway(keys, 400, error, []))

    with pytest.raises(TradeAlreadyPaidError) as caught:
        provider.close_trade("T20250520000001")

    assert (caught.value.code, caught.value.message, caught.value.status) == (
        "ORDERPAID",
        "订单已支付",
        400,
    )


def test_close_trade_passes_other_rejections_on(keys: Keys, config: WechatPayConfig) -> None:
    error = {"code": "PARAM_ERROR", "message": "mchid"}
    provider = provider_on(config, gateway(keys, 400, error, []))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.close_trade("T20250520000001")

    assert type(caught.value) is ProviderRejectedError
    assert caught.value.code == "PARAM_ERROR"


def refund_object(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "refund_id": "50000000382019052709732678859",
        "out_refund_no": "R20250520000001",
        "transaction_id": "4200000123202505201234567890",
        "out_trade_no": "T20250520000001",
        "channel": "ORIGINAL",
        "user_received_account": "支付用户零钱",
        "success_time": "2025-05-20T13:29:35+08:00",
        "create_time": "2025-05-20T13:29:35+08:00",
        "status": "SUCCESS",
        "funds_account": "AVAILABLE",
        "amount": {
            "total": 800,
            "refund": 300,
            "from": [],
            "payer_total": 800,
            "payer_refund": 300,
            "settlement_refund": 300,
            "settlement_total": 800,
            "discount_refund": 0,
            "currency": "CNY",
        },
        "promotion_detail": [],
    }
    return data | changes


def a_refund(reason: str = "The dryer did not start") -> RefundRequest:
    return RefundRequest(
        out_trade_no="T20250520000001",
        refund_key="R20250520000001",
        amount_fen=300,
        total_fen=800,
        reason=reason,
    )


def test_a_refund_request_posts_the_documented_body(keys: Keys, config: WechatPayConfig) -> None:
    seen: list[httpx.Request] = []
    provider = provider_on(config, gateway(keys, 200, refund_object(), seen))

    outcome = provider.refund(a_refund("退" * 81))

    assert outcome == RefundOutcome(
        refund_key="R20250520000001",
        state=RefundState.SUCCESS,
        amount_fen=300,
        provider_refund_id="50000000382019052709732678859",
    )
    request = seen[0]
    assert (request.method, request.url.path) == (
        "POST",
        "/sandbox/wechatpay/v3/refund/domestic/refunds",
    )
    assert json.loads(request.content) == {
        "out_trade_no": "T20250520000001",
        "out_refund_no": "R20250520000001",
        "reason": "退" * 80,
        "amount": {"refund": 300, "total": 800, "currency": "CNY"},
    }
    auth = wire.parse_authorization(request.headers["Authorization"])
    message = wire.request_message(
        "POST", "/v3/refund/domestic/refunds", auth.timestamp, auth.nonce_str, request.content
    )
    assert crypto.verify_b64(keys.merchant.public_key(), message, auth.signature) is True


def test_a_refund_without_a_reason_sends_none(keys: Keys, config: WechatPayConfig) -> None:
    seen: list[httpx.Request] = []
    provider = provider_on(config, gateway(keys, 200, refund_object(), seen))

    provider.refund(a_refund(reason=""))

    assert "reason" not in json.loads(seen[0].content)


@pytest.mark.parametrize(
    ("wire_status", "state"),
    [
        ("SUCCESS", RefundState.SUCCESS),
        ("PROCESSING", RefundState.PROCESSING),
        ("ABNORMAL", RefundState.ABNORMAL),
        ("CLOSED", RefundState.ABNORMAL),
    ],
)
def test_refund_statuses_map_to_ours(
    keys: Keys, config: WechatPayConfig, wire_status: str, state: RefundState
) -> None:
    provider = provider_on(config, gateway(keys, 200, refund_object(status=wire_status), []))

    assert provider.refund(a_refund()).state == state
    assert refund_state(c.WireRefundStatus(wire_status)) == state


def test_every_wire_status_has_a_mapping() -> None:
    assert {refund_state(status) for status in c.WireRefundStatus} <= set(RefundState)
    assert {trade_state(state) for state in c.WireTradeState} <= set(TradeState)


def test_a_refund_query_gets_the_refund_by_its_key(keys: Keys, config: WechatPayConfig) -> None:
    seen: list[httpx.Request] = []
    answer = refund_object(status="PROCESSING")
    del answer["success_time"]
    provider = provider_on(config, gateway(keys, 200, answer, seen))

    outcome = provider.query_refund("T20250520000001", "R20250520000001")

    assert outcome == RefundOutcome(
        "R20250520000001", RefundState.PROCESSING, 300, "50000000382019052709732678859"
    )
    assert (seen[0].method, seen[0].url.path, seen[0].content) == (
        "GET",
        "/sandbox/wechatpay/v3/refund/domestic/refunds/R20250520000001",
        b"",
    )


def test_a_refund_query_of_an_unknown_key_is_not_found(keys: Keys, config: WechatPayConfig) -> None:
    error = {"code": "RESOURCE_NOT_EXISTS", "message": "退款单不存在"}
    provider = provider_on(config, gateway(keys, 404, error, []))

    assert provider.query_refund("T20250520000001", "R20250520000001") == RefundOutcome(
        "R20250520000001", RefundState.NOT_FOUND, 0, None
    )


def test_a_refund_answer_about_another_trade_is_refused(
    keys: Keys, config: WechatPayConfig
) -> None:
    answer = refund_object(out_trade_no="T20250520000002")
    provider = provider_on(config, gateway(keys, 200, answer, []))

    with pytest.raises(ProviderRejectedError, match="REFUND_KEY_MISMATCH"):
        provider.query_refund("T20250520000001", "R20250520000001")


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (500, {"code": "SYSTEM_ERROR", "message": "系统错误"}),
        (503, {"code": "SYSTEM_ERROR", "message": "系统繁忙"}),
    ],
)
def test_a_refund_failing_on_the_providers_side_is_unavailable(
    keys: Keys, config: WechatPayConfig, status: int, answer: dict[str, str]
) -> None:
    provider = provider_on(config, gateway(keys, status, answer, []))

    with pytest.raises(ProviderUnavailableError, match=f"HTTP {status}"):
        provider.refund(a_refund())


@pytest.mark.parametrize(
    ("status", "code"), [(403, "NOT_ENOUGH"), (400, "INVALID_REQUEST"), (400, "PARAM_ERROR")]
)
def test_a_refused_refund_is_rejected_with_the_providers_code(
    keys: Keys, config: WechatPayConfig, status: int, code: str
) -> None:
    provider = provider_on(config, gateway(keys, status, {"code": code, "message": "no"}, []))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.refund(a_refund())

    assert (caught.value.code, caught.value.status) == (code, status)


# --- the trade bill ------------------------------------------------------------------------

HEADER = ",".join(c.TRADE_BILL_ALL_COLUMNS)
TOTALS_HEADER = ",".join(c.TRADE_BILL_TOTALS_COLUMNS)
PAYMENT_LINE = (
    "`2025-05-20 13:01:00,`wxd678efh567hg6787,`1900000001,`0,`,`4200000123202505201234567890,"
    "`T20250520000001,`oUpF8uMuAJO_M2pxb1Q9zNjWeS6o,`NATIVE,`SUCCESS,`OTHERS,`CNY,`8.00,`0.00,"
    "`0,`0,`0.00,`0.00,`,`,`Dry 30 min,`,`0.05,`0.60%,`8.00,`0.00,`"
)
REFUND_LINE = (
    "`2025-05-20 13:10:00,`wxd678efh567hg6787,`1900000001,`0,`,`4200000123202505201234567890,"
    "`T20250520000001,`oUpF8uMuAJO_M2pxb1Q9zNjWeS6o,`NATIVE,`REFUND,`OTHERS,`CNY,`0.00,`0.00,"
    "`50000000382019052709732678859,`R20250520000001,`3.00,`0.00,`ORIGINAL,`SUCCESS,"
    "`Dry 30 min,`,`-0.02,`0.60%,`0.00,`3.00,`"
)
TOTALS_LINE = "`2,`8.00,`3.00,`0.00,`0.03,`8.00,`3.00"
BILL = "\r\n".join([HEADER, PAYMENT_LINE, REFUND_LINE, TOTALS_HEADER, TOTALS_LINE, ""])
PAID_AT = datetime(2025, 5, 20, 5, 1, tzinfo=UTC)
REFUNDED_AT = datetime(2025, 5, 20, 5, 10, tzinfo=UTC)
EXPECTED_ENTRIES = [
    BillEntry(
        BillEntryKind.PAYMENT,
        "T20250520000001",
        "4200000123202505201234567890",
        None,
        800,
        5,
        PAID_AT,
    ),
    BillEntry(
        BillEntryKind.REFUND,
        "T20250520000001",
        "4200000123202505201234567890",
        "R20250520000001",
        300,
        -2,
        REFUNDED_AT,
    ),
]


def test_a_bill_is_read_by_column_name_without_backticks_up_to_the_totals() -> None:
    rows = wire.parse_trade_bill(BILL)

    assert [(row.trade_state, row.out_refund_no, row.fee) for row in rows] == [
        ("SUCCESS", "0", "0.05"),
        ("REFUND", "R20250520000001", "-0.02"),
    ]
    assert bill_entries(rows) == EXPECTED_ENTRIES


def _with_extra_column(line: str, cell: str) -> str:
    # A column the parser does not know, inserted before 应结订单金额.
    cells = line.split(",")
    return ",".join([*cells[:12], cell, *cells[12:]])


def test_a_bill_with_an_extra_column_in_the_middle_reads_the_same() -> None:
    bill = "\n".join(
        [
            _with_extra_column(HEADER, "订单优惠金额"),
            _with_extra_column(PAYMENT_LINE, "`1.00"),
            _with_extra_column(REFUND_LINE, "`0.00"),
            TOTALS_HEADER,
            TOTALS_LINE,
        ]
    )

    assert bill_entries(wire.parse_trade_bill("\ufeff" + bill)) == EXPECTED_ENTRIES


def test_a_bill_cell_with_a_comma_is_quoted_and_read_whole() -> None:
    line = PAYMENT_LINE.replace("`Dry 30 min", '"`Dry, 30 min"')
    bill = "\n".join([HEADER, line, TOTALS_HEADER, "`1,`8.00,`0.00,`0.00,`0.05,`8.00,`0.00"])

    (row,) = wire.parse_trade_bill(bill)

    assert row.settlement_total == "8.00"


def test_bill_lines_in_other_states_carry_no_money() -> None:
    revoked = PAYMENT_LINE.replace("`SUCCESS", "`REVOKED")
    bill = "\n".join([HEADER, revoked, REFUND_LINE, TOTALS_HEADER, TOTALS_LINE])

    assert bill_entries(wire.parse_trade_bill(bill)) == EXPECTED_ENTRIES[1:]


@pytest.mark.parametrize(
    ("bill", "error"),
    [
        ("", "does not start with its header"),
        (PAYMENT_LINE, "does not start with its header"),
        ("\n".join([HEADER, PAYMENT_LINE]), "lacks its totals"),
        ("\n".join([HEADER, PAYMENT_LINE + ",`x", TOTALS_HEADER]), "has 28 cells, not 27"),
        ("\n".join([HEADER + ",交易时间", TOTALS_HEADER]), "repeats a column"),
    ],
)
def test_a_malformed_bill_is_refused(bill: str, error: str) -> None:
    with pytest.raises(wire.WireError, match=error):
        wire.parse_trade_bill(bill)


def test_a_bill_line_missing_a_needed_column_is_refused() -> None:
    header = HEADER.replace("手续费", "服务费")

    with pytest.raises(wire.WireError, match="bill line 2"):
        wire.parse_trade_bill("\n".join([header, PAYMENT_LINE, TOTALS_HEADER]))


def bill_gateway(
    keys: Keys, content: bytes, *, hash_of: bytes | None = None, seen: list[httpx.Request]
) -> Handler:
    """Answer the tradebill call (signed) and the download (raw, unsigned)."""
    digest = hashlib.sha1(
        content if hash_of is None else hash_of, usedforsecurity=False
    ).hexdigest()

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/v3/bill/tradebill"):
            answer = {
                "hash_type": "SHA1",
                "hash_value": digest,
                "download_url": "https://gateway.test/sandbox/wechatpay/v3/billdownload/file?token=t1",
            }
            body = json.dumps(answer).encode()
            return httpx.Response(200, headers=signed_headers(keys.platform, body), content=body)
        return httpx.Response(200, content=gzip.compress(content))

    return handle


def test_fetch_bill_asks_for_the_gzipped_all_bill_and_checks_its_sha1(
    keys: Keys, config: WechatPayConfig
) -> None:
    seen: list[httpx.Request] = []
    provider = provider_on(config, bill_gateway(keys, BILL.encode(), seen=seen))

    entries = provider.fetch_bill(date(2025, 5, 20))

    assert entries == EXPECTED_ENTRIES
    step1, step2 = seen
    assert str(step1.url) == (
        "https://gateway.test/sandbox/wechatpay/v3/bill/tradebill"
        "?bill_date=2025-05-20&bill_type=ALL&tar_type=GZIP"
    )
    assert str(step2.url) == "https://gateway.test/sandbox/wechatpay/v3/billdownload/file?token=t1"
    auth = wire.parse_authorization(step2.headers["Authorization"])
    message = wire.request_message(
        "GET", "/v3/billdownload/file?token=t1", auth.timestamp, auth.nonce_str, b""
    )
    assert crypto.verify_b64(keys.merchant.public_key(), message, auth.signature) is True


def test_a_bill_whose_sha1_differs_is_never_trusted(keys: Keys, config: WechatPayConfig) -> None:
    forged = BILL.replace("`8.00", "`80.00").encode()
    provider = provider_on(config, bill_gateway(keys, forged, hash_of=BILL.encode(), seen=[]))

    with pytest.raises(ProviderSignatureError, match="SHA-1"):
        provider.fetch_bill(date(2025, 5, 20))


def test_a_day_without_a_statement_has_no_entries(keys: Keys, config: WechatPayConfig) -> None:
    error = {"code": "NO_STATEMENT_EXIST", "message": "当日无账单"}
    provider = provider_on(config, gateway(keys, 400, error, []))

    assert provider.fetch_bill(date(2025, 5, 20)) == []


def test_a_bill_that_does_not_parse_is_unavailable(keys: Keys, config: WechatPayConfig) -> None:
    broken = BILL.replace("`8.00,`0.00,`0,", "`8.001,`0.00,`0,").encode()
    provider = provider_on(config, bill_gateway(keys, broken, seen=[]))

    with pytest.raises(ProviderUnavailableError, match="malformed trade bill of 2025-05-20"):
        provider.fetch_bill(date(2025, 5, 20))

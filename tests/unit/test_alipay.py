"""Alipay RSA2 signing, response extraction, notify verification and the adapter's mapping."""

import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from roompay.domain.catalog import Wallet
from roompay.payments.alipay import AlipayConfig, AlipayProvider
from roompay.payments.alipay.adapter import timeout_minutes, trade_state
from roompay.payments.alipay.client import (
    beijing_timestamp,
    extract_signed_response,
    parse_beijing_timestamp,
    request_sign_content,
)
from roompay.payments.alipay.constants import TradeStatus
from roompay.payments.alipay.notify import notify_sign_content, verify_notify
from roompay.payments.base import (
    BillEntry,
    BillEntryKind,
    NotifyReply,
    PaymentProvider,
    QrOrderRequest,
    RefundOutcome,
    RefundRequest,
    RefundState,
    TradeSnapshot,
    TradeState,
)
from roompay.payments.crypto import (
    generate_private_key,
    private_key_pem,
    public_key_pem,
    sign_b64,
    verify_b64,
)
from roompay.payments.errors import (
    NotificationRejectedError,
    ProviderRejectedError,
    ProviderSignatureError,
    ProviderUnavailableError,
    TradeAlreadyPaidError,
)

NOW = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)  # 20:30 in Beijing
GATEWAY = "https://openapi.example.test/gateway.do"
APP_ID = "2021000000000001"
SELLER_ID = "2088000000000002"


@dataclass
class FixedClock:
    at: datetime = NOW

    def now(self) -> datetime:
        return self.at


@dataclass(frozen=True)
class Keys:
    app: rsa.RSAPrivateKey
    alipay: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(app=generate_private_key(), alipay=generate_private_key())


def make_config(keys: Keys) -> AlipayConfig:
    return AlipayConfig(
        app_id=APP_ID,
        seller_id=SELLER_ID,
        app_private_key_pem=private_key_pem(keys.app),
        alipay_public_key_pem=public_key_pem(keys.alipay),
        gateway_url=GATEWAY,
    )


def signed_response_text(key: rsa.RSAPrivateKey, name: str, inner: str) -> str:
    return '{"' + name + '":' + inner + ',"sign":"' + sign_b64(key, inner.encode()) + '"}'


def provider_answering(
    keys: Keys, answer: Callable[[httpx.Request], httpx.Response]
) -> tuple[AlipayProvider, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(request)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    return AlipayProvider(make_config(keys), FixedClock(), http), seen


def notify_fields(**overrides: str) -> dict[str, str]:
    fields = {
        "notify_time": "2026-03-01 20:31:06",
        "notify_type": "trade_status_sync",
        "notify_id": "4f1c0a9e2b7d4c3a8e6f5d4c3b2a1908",
        "app_id": APP_ID,
        "charset": "utf-8",
        "version": "1.0",
        "sign_type": "RSA2",
        "trade_no": "2026030122001400000000000001",
        "out_trade_no": "a1b2c3d4",
        "buyer_id": "2088000000000099",
        "buyer_logon_id": "gue***@example.com",
        "seller_id": SELLER_ID,
        "trade_status": "TRADE_SUCCESS",
        "total_amount": "3.05",
        "receipt_amount": "3.05",
        "buyer_pay_amount": "3.05",
        "invoice_amount": "3.05",
        "point_amount": "0.00",
        "subject": "干衣机 30 分钟",
        "gmt_create": "2026-03-01 20:31:00",
        "gmt_payment": "2026-03-01 20:31:05",
        "fund_bill_list": '[{"amount":"3.05","fundChannel":"ALIPAYACCOUNT"}]',
    }
    fields.update(overrides)
    return fields


def signed_notify(key: rsa.RSAPrivateKey, fields: dict[str, str]) -> dict[str, str]:
    return {**fields, "sign": sign_b64(key, notify_sign_content(fields).encode())}


# --- request signing -----------------------------------------------------------


def test_request_sign_content_sorts_drops_empty_and_sign_keeps_sign_type() -> None:
    params = {
        "timestamp": "2026-03-01 20:30:00",
        "sign": "c2lnbg==",
        "app_id": APP_ID,
        "notify_url": "",
        "sign_type": "RSA2",
        "biz_content": '{"subject":"干衣机 & 香薰=1"}',
        "method": "alipay.trade.precreate",
    }

    content = request_sign_content(params)

    assert content == (
        f'app_id={APP_ID}&biz_content={{"subject":"干衣机 & 香薰=1"}}'
        "&method=alipay.trade.precreate&sign_type=RSA2&timestamp=2026-03-01 20:30:00"
    )


def test_signed_params_carry_beijing_timestamp_compact_utf8_biz_and_a_valid_sign(
    keys: Keys,
) -> None:
    provider, _ = provider_answering(keys, lambda _: httpx.Response(500))

    params = provider.client.signed_params(
        "alipay.trade.precreate",
        {"out_trade_no": "a1", "total_amount": "8.00", "subject": "干衣机"},
        notify_url="https://roompay.example/notify/alipay",
    )

    sign = params.pop("sign")
    assert params == {
        "app_id": APP_ID,
        "method": "alipay.trade.precreate",
        "format": "JSON",
        "charset": "utf-8",
        "sign_type": "RSA2",
        "timestamp": "2026-03-01 20:30:00",
        "version": "1.0",
        "biz_content": '{"out_trade_no":"a1","total_amount":"8.00","subject":"干衣机"}',
        "notify_url": "https://roompay.example/notify/alipay",
    }
    expected = "&".join(f"{k}={v}" for k, v in sorted(params.items()))
    assert verify_b64(keys.app.public_key(), expected.encode(), sign)


def test_beijing_timestamps_round_trip() -> None:
    assert beijing_timestamp(NOW) == "2026-03-01 20:30:00"
    assert parse_beijing_timestamp("2026-03-01 20:30:00") == NOW


# --- sync responses --------------------------------------------------------------


def test_extract_signed_response_slices_the_exact_inner_text_with_non_ascii() -> None:
    inner = '{ "code":"10000","msg":"Success","subject":"干衣机 \\u9999\\"}{","n":{"a":[1,2]} }'
    text = '{"alipay_trade_query_response":' + inner + ' , "sign" : "c2ln"}\n'

    signed = extract_signed_response(text, "alipay.trade.query")

    assert signed.key == "alipay_trade_query_response"
    assert signed.body_text == inner
    assert signed.body == {
        "code": "10000",
        "msg": "Success",
        "subject": '干衣机 香"}{',
        "n": {"a": [1, 2]},
    }
    assert signed.sign == "c2ln"


def test_extract_signed_response_falls_back_to_error_response_and_missing_sign() -> None:
    text = '{"error_response":{"code":"40002","sub_code":"isv.invalid-app-id"}}'

    signed = extract_signed_response(text, "alipay.trade.precreate")

    assert signed.key == "error_response"
    assert signed.body_text == '{"code":"40002","sub_code":"isv.invalid-app-id"}'
    assert signed.sign is None


@pytest.mark.parametrize(
    "text",
    [
        "<html>502</html>",
        '{"other_response":{}}',
        '{"alipay_trade_query_response":{"code":"10000"}} trailing',
        '{"alipay_trade_query_response":"text","sign":"x"}',
        '{"alipay_trade_query_response":{},"alipay_trade_query_response":{}}',
    ],
)
def test_extract_signed_response_rejects_malformed_text(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - every malformation is a plain ValueError
        extract_signed_response(text, "alipay.trade.query")


def test_client_verifies_the_sign_over_escaped_text_as_sent(keys: Keys) -> None:
    # Re-serializing the parsed object would turn \u5e72 into 干 and break the sign.
    inner = '{"code":"10000","msg":"Success","out_trade_no":"a1","qr_code":"https://qr.alipay.com/bax0\\u5e72"}'
    text = signed_response_text(keys.alipay, "alipay_trade_precreate_response", inner)
    provider, _ = provider_answering(keys, lambda _: httpx.Response(200, text=text))

    result = provider.client.precreate("a1", 800, "dry", 5, None)

    assert result.qr_code == "https://qr.alipay.com/bax0干"


def test_client_sends_common_params_in_query_and_biz_content_in_form(keys: Keys) -> None:
    inner = '{"code":"10000","msg":"Success","out_trade_no":"a1","qr_code":"https://qr.alipay.com/bax01"}'
    text = signed_response_text(keys.alipay, "alipay_trade_precreate_response", inner)
    provider, seen = provider_answering(keys, lambda _: httpx.Response(200, text=text))
    request = QrOrderRequest(
        out_trade_no="a1",
        description="干" * 300,
        amount_fen=800,
        expires_at=NOW + timedelta(minutes=5, seconds=59),
        notify_url="https://roompay.example/notify/alipay",
    )

    order = provider.create_qr_order(request)

    assert order.qr_content == "https://qr.alipay.com/bax01"
    (sent,) = seen
    assert sent.method == "POST"
    assert sent.headers["content-type"] == "application/x-www-form-urlencoded;charset=utf-8"
    query = dict(parse_qsl(urlsplit(str(sent.url)).query))
    assert sorted(query) == [
        "app_id", "charset", "format", "method", "notify_url", "sign", "sign_type",
        "timestamp", "version",
    ]  # fmt: skip
    form = dict(parse_qsl(sent.content.decode()))
    assert list(form) == ["biz_content"]
    assert json.loads(form["biz_content"]) == {
        "out_trade_no": "a1",
        "total_amount": "8.00",
        "subject": "干" * 256,
        "timeout_express": "5m",
    }
    signed = request_sign_content({**query, **form})
    assert verify_b64(keys.app.public_key(), signed.encode(), query["sign"])


def _answer(keys: Keys, inner: dict[str, str], signed: bool = True) -> httpx.Response:
    text = json.dumps(inner, ensure_ascii=False, separators=(",", ":"))
    if not signed:
        return httpx.Response(200, text='{"alipay_trade_query_response":' + text + "}")
    return httpx.Response(
        200, text=signed_response_text(keys.alipay, "alipay_trade_query_response", text)
    )


def test_business_failure_becomes_provider_rejected_with_sub_code(keys: Keys) -> None:
    inner = {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.TRADE_NOT_EXIST",
             "sub_msg": "交易不存在"}  # fmt: skip
    provider, _ = provider_answering(keys, lambda _: _answer(keys, inner))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.client.query_order("a1")

    assert (caught.value.code, caught.value.message) == ("ACQ.TRADE_NOT_EXIST", "交易不存在")
    assert provider.query_trade("a1") == TradeSnapshot("a1", TradeState.NOT_FOUND, None, None, None)


def test_signed_error_response_becomes_provider_rejected(keys: Keys) -> None:
    inner = (
        '{"code":"40002","msg":"Invalid Arguments",'
        '"sub_code":"isv.invalid-signature","sub_msg":"验签出错"}'
    )
    text = signed_response_text(keys.alipay, "error_response", inner)
    provider, _ = provider_answering(keys, lambda _: httpx.Response(200, text=text))

    with pytest.raises(ProviderRejectedError) as caught:
        provider.client.query_order("a1")

    assert (caught.value.code, caught.value.message) == ("isv.invalid-signature", "验签出错")


@pytest.mark.parametrize(
    "inner",
    [
        {"code": "20000", "msg": "Service Currently Unavailable", "sub_code": "isp.unknow-error"},
        {"code": "40004", "msg": "Business Failed", "sub_code": "ACQ.SYSTEM_ERROR"},
    ],
)
def test_provider_side_failures_are_retryable(keys: Keys, inner: dict[str, str]) -> None:
    provider, _ = provider_answering(keys, lambda _: _answer(keys, inner))

    with pytest.raises(ProviderUnavailableError):
        provider.client.query_order("a1")


def _refuse_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


@pytest.mark.parametrize(
    "answer",
    [
        _refuse_connection,
        lambda _: httpx.Response(502, text="bad gateway"),
        lambda _: httpx.Response(200, text="<html>proxy</html>"),
    ],
)
def test_network_failures_are_retryable(
    keys: Keys, answer: Callable[[httpx.Request], httpx.Response]
) -> None:
    provider, _ = provider_answering(keys, answer)

    with pytest.raises(ProviderUnavailableError):
        provider.client.query_order("a1")


def test_unsigned_and_badly_signed_responses_are_never_trusted(keys: Keys) -> None:
    inner = {"code": "10000", "msg": "Success", "trade_no": "1", "out_trade_no": "a1",
             "trade_status": "TRADE_SUCCESS", "total_amount": "3.00"}  # fmt: skip
    unsigned, _ = provider_answering(keys, lambda _: _answer(keys, inner, signed=False))
    good = _answer(keys, inner).text
    forged = good.replace('"3.00"', '"0.01"')
    tampered, _ = provider_answering(keys, lambda _: httpx.Response(200, text=forged))

    with pytest.raises(ProviderSignatureError, match="no sign"):
        unsigned.client.query_order("a1")
    with pytest.raises(ProviderSignatureError, match="does not verify"):
        tampered.client.query_order("a1")


# --- notifies -----------------------------------------------------------------------


def test_notify_sign_content_drops_sign_and_sign_type_but_keeps_empty_values() -> None:
    fields = {"b": "2", "sign": "x", "a": "干 1", "sign_type": "RSA2", "c": ""}

    assert notify_sign_content(fields) == "a=干 1&b=2&c="


def test_notify_is_verified_over_url_decoded_values(keys: Keys) -> None:
    body = urlencode(signed_notify(keys.alipay, notify_fields())).encode()

    notify = verify_notify(body, keys.alipay.public_key())

    assert (notify.out_trade_no, notify.total_amount, notify.trade_status) == (
        "a1b2c3d4",
        305,
        TradeStatus.TRADE_SUCCESS,
    )


def test_notify_signed_by_another_key_is_rejected(keys: Keys) -> None:
    body = urlencode(signed_notify(keys.app, notify_fields())).encode()

    with pytest.raises(NotificationRejectedError, match="does not verify"):
        verify_notify(body, keys.alipay.public_key())


def test_notify_with_altered_amount_is_rejected(keys: Keys) -> None:
    fields = signed_notify(keys.alipay, notify_fields())
    fields["total_amount"] = "0.01"

    with pytest.raises(NotificationRejectedError, match="does not verify"):
        verify_notify(urlencode(fields).encode(), keys.alipay.public_key())


def test_notify_without_sign_is_rejected(keys: Keys) -> None:
    body = urlencode(notify_fields()).encode()

    with pytest.raises(NotificationRejectedError, match="no sign"):
        verify_notify(body, keys.alipay.public_key())


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"a=1&a=2&sign=x", "repeats"),
        (b"subject=\xff&sign=x", "UTF-8"),
        (b"sign=x&sign_type=RSA", "not RSA2"),
        (b"sign=x&charset=GBK", "not utf-8"),
    ],
)
def test_malformed_notify_forms_are_rejected(keys: Keys, body: bytes, reason: str) -> None:
    with pytest.raises(NotificationRejectedError, match=reason):
        verify_notify(body, keys.alipay.public_key())


def test_authentic_notify_with_fractional_fen_is_rejected(keys: Keys) -> None:
    body = urlencode(signed_notify(keys.alipay, notify_fields(total_amount="3.001"))).encode()

    with pytest.raises(NotificationRejectedError, match="malformed notify"):
        verify_notify(body, keys.alipay.public_key())


# --- the adapter ----------------------------------------------------------------------


def test_parse_notification_maps_yuan_beijing_time_and_ids(keys: Keys) -> None:
    provider, _ = provider_answering(keys, lambda _: httpx.Response(500))
    body = urlencode(signed_notify(keys.alipay, notify_fields(total_amount="1234.50"))).encode()

    notification = provider.parse_notification({}, body, NOW)

    assert notification.wallet is Wallet.ALIPAY
    assert notification.out_trade_no == "a1b2c3d4"
    assert notification.provider_trade_no == "2026030122001400000000000001"
    assert notification.state is TradeState.SUCCESS
    assert notification.amount_fen == 123450
    assert notification.paid_at == datetime(2026, 3, 1, 12, 31, 5, tzinfo=UTC)
    assert notification.notification_id == "4f1c0a9e2b7d4c3a8e6f5d4c3b2a1908"
    assert notification.merchant_ok is True


@pytest.mark.parametrize(
    ("overrides", "merchant_ok"),
    [({"app_id": "2021999999999999"}, False), ({"seller_id": "2088999999999999"}, False)],
)
def test_authentic_notify_for_another_merchant_is_flagged(
    keys: Keys, overrides: dict[str, str], merchant_ok: bool
) -> None:
    provider, _ = provider_answering(keys, lambda _: httpx.Response(500))
    body = urlencode(signed_notify(keys.alipay, notify_fields(**overrides))).encode()

    assert provider.parse_notification({}, body, NOW).merchant_ok is merchant_ok


@pytest.mark.parametrize(
    ("status", "refund_fee", "state"),
    [
        (TradeStatus.TRADE_SUCCESS, None, TradeState.SUCCESS),
        (TradeStatus.TRADE_FINISHED, None, TradeState.SUCCESS),
        (TradeStatus.WAIT_BUYER_PAY, None, TradeState.NOT_PAID),
        (TradeStatus.TRADE_CLOSED, None, TradeState.CLOSED),
        (TradeStatus.TRADE_CLOSED, 305, TradeState.REFUNDED),
        (TradeStatus.TRADE_SUCCESS, 100, TradeState.REFUNDED),
    ],
)
def test_trade_state_mapping(
    status: TradeStatus, refund_fee: int | None, state: TradeState
) -> None:
    assert trade_state(status, refund_fee) is state


def test_closed_notify_with_refund_fee_is_a_refund(keys: Keys) -> None:
    provider, _ = provider_answering(keys, lambda _: httpx.Response(500))
    fields = notify_fields(trade_status="TRADE_CLOSED", refund_fee="3.05", gmt_payment="")
    body = urlencode(signed_notify(keys.alipay, fields)).encode()

    notification = provider.parse_notification({}, body, NOW)

    assert (notification.state, notification.paid_at) == (TradeState.REFUNDED, None)


@pytest.mark.parametrize(
    ("left", "minutes"),
    [(timedelta(seconds=20), 1), (timedelta(minutes=5, seconds=59), 5),
     (timedelta(minutes=-3), 1), (timedelta(days=30), 21600)],
)  # fmt: skip
def test_timeout_minutes_round_down_within_bounds(left: timedelta, minutes: int) -> None:
    assert timeout_minutes(NOW + left, NOW) == minutes


def test_replies_are_exact_plain_text(keys: Keys) -> None:
    provider, _ = provider_answering(keys, lambda _: httpx.Response(500))

    assert provider.reply_ok() == NotifyReply(200, b"success", "text/plain")
    assert provider.reply_fail("unknown order") == NotifyReply(200, b"fail", "text/plain")


def test_alipay_provider_is_a_payment_provider(keys: Keys) -> None:
    alipay = AlipayProvider(make_config(keys), FixedClock())
    provider: PaymentProvider = alipay

    assert provider.wallet is Wallet.ALIPAY
    alipay.close()


# --- query, close, refund, refund query and bill through the adapter ------------------------


@dataclass
class ScriptedGateway:
    """Answers each gateway method from a script of inner objects, signed by Alipay's key."""

    keys: Keys
    script: dict[str, list[dict[str, str]]]
    files: dict[str, bytes] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            self.seen.append(("GET " + str(request.url), {}))
            return httpx.Response(200, content=self.files[str(request.url)])
        method = request.url.params["method"]
        biz = json.loads(dict(parse_qsl(request.content.decode()))["biz_content"])
        self.seen.append((method, biz))
        inner = json.dumps(self.script[method].pop(0), ensure_ascii=False, separators=(",", ":"))
        name = method.replace(".", "_") + "_response"
        return httpx.Response(200, text=signed_response_text(self.keys.alipay, name, inner))


def scripted(keys: Keys, **script: list[dict[str, str]]) -> tuple[AlipayProvider, ScriptedGateway]:
    gateway = ScriptedGateway(keys, {k.replace("_", "."): v for k, v in script.items()})
    http = httpx.Client(transport=httpx.MockTransport(gateway))
    return AlipayProvider(make_config(keys), FixedClock(), http), gateway


OK = {"code": "10000", "msg": "Success"}
TRADE = {**OK, "trade_no": "2026030122001400000000000001", "out_trade_no": "a1",
         "total_amount": "8.00"}  # fmt: skip


def failure(sub_code: str, code: str = "40004") -> dict[str, str]:
    return {"code": code, "msg": "Business Failed", "sub_code": sub_code, "sub_msg": sub_code}


@pytest.mark.parametrize(
    ("answer", "snapshot"),
    [
        (failure("ACQ.TRADE_NOT_EXIST"),
         TradeSnapshot("a1", TradeState.NOT_FOUND, None, None, None)),
        (
            {**TRADE, "trade_status": "WAIT_BUYER_PAY"},
            TradeSnapshot("a1", TradeState.NOT_PAID, 800, "2026030122001400000000000001", None),
        ),
        (
            {**TRADE, "trade_status": "TRADE_SUCCESS", "send_pay_date": "2026-03-01 20:31:05"},
            TradeSnapshot("a1", TradeState.SUCCESS, 800, "2026030122001400000000000001",
                          datetime(2026, 3, 1, 12, 31, 5, tzinfo=UTC)),
        ),
        (
            {**TRADE, "trade_status": "TRADE_FINISHED", "send_pay_date": "2026-03-01 20:31:05"},
            TradeSnapshot("a1", TradeState.SUCCESS, 800, "2026030122001400000000000001",
                          datetime(2026, 3, 1, 12, 31, 5, tzinfo=UTC)),
        ),
        (
            {**TRADE, "trade_status": "TRADE_CLOSED"},
            TradeSnapshot("a1", TradeState.CLOSED, 800, "2026030122001400000000000001", None),
        ),
    ],
)  # fmt: skip
def test_query_trade_maps_status_amount_and_pay_date(
    keys: Keys, answer: dict[str, str], snapshot: TradeSnapshot
) -> None:
    provider, gateway = scripted(keys, alipay_trade_query=[answer])

    assert provider.query_trade("a1") == snapshot
    assert gateway.seen == [("alipay.trade.query", {"out_trade_no": "a1"})]


def test_query_trade_refuses_an_answer_about_another_trade(keys: Keys) -> None:
    answer = {**TRADE, "out_trade_no": "a2", "trade_status": "TRADE_SUCCESS"}
    provider, _ = scripted(keys, alipay_trade_query=[answer])

    with pytest.raises(ProviderRejectedError, match="asked about a1, got a2"):
        provider.query_trade("a1")


@pytest.mark.parametrize(
    ("close", "query"),
    [
        ([OK | {"trade_no": "t", "out_trade_no": "a1"}], []),
        ([failure("ACQ.TRADE_NOT_EXIST")], []),
        ([failure("ACQ.TRADE_STATUS_ERROR")], [{**TRADE, "trade_status": "TRADE_CLOSED"}]),
    ],
    ids=["closed-now", "never-scanned", "already-closed"],
)
def test_close_trade_is_idempotent(
    keys: Keys, close: list[dict[str, str]], query: list[dict[str, str]]
) -> None:
    expected = ["alipay.trade.close"] + ["alipay.trade.query"] * len(query)
    provider, gateway = scripted(keys, alipay_trade_close=close, alipay_trade_query=query)

    provider.close_trade("a1")

    assert [method for method, _ in gateway.seen] == expected


@pytest.mark.parametrize(
    "paid",
    [
        {**TRADE, "trade_status": "TRADE_SUCCESS", "send_pay_date": "2026-03-01 20:31:05"},
        {**TRADE, "trade_status": "TRADE_CLOSED", "send_pay_date": "2026-03-01 20:31:05"},
    ],
    ids=["paid", "paid-then-fully-refunded"],
)
def test_closing_a_paid_trade_raises_trade_already_paid(keys: Keys, paid: dict[str, str]) -> None:
    provider, _ = scripted(
        keys, alipay_trade_close=[failure("ACQ.TRADE_STATUS_ERROR")], alipay_trade_query=[paid]
    )

    with pytest.raises(TradeAlreadyPaidError) as caught:
        provider.close_trade("a1")

    assert caught.value.code == "ACQ.TRADE_STATUS_ERROR"


def refund_request(amount_fen: int = 300, key: str = "r-0001") -> RefundRequest:
    return RefundRequest("a1", key, amount_fen, 800, "machine did not start")


REFUNDED = {**OK, "trade_no": "2026030122001400000000000001", "out_trade_no": "a1",
            "buyer_logon_id": "gue***@example.com", "refund_fee": "5.00",
            "gmt_refund_pay": "2026-03-01 20:45:00", "send_back_fee": "3.00"}  # fmt: skip


@pytest.mark.parametrize("fund_change", ["Y", "N"])
def test_refund_sends_the_key_as_out_request_no_and_succeeds_at_once(
    keys: Keys, fund_change: str
) -> None:
    provider, gateway = scripted(
        keys, alipay_trade_refund=[{**REFUNDED, "fund_change": fund_change}]
    )

    outcome = provider.refund(refund_request())

    # amount_fen is this refund's, not the cumulative refund_fee of 5.00.
    assert outcome == RefundOutcome("r-0001", RefundState.SUCCESS, 300, None)
    assert gateway.seen == [
        (
            "alipay.trade.refund",
            {"out_trade_no": "a1", "out_request_no": "r-0001", "refund_amount": "3.00",
             "refund_reason": "machine did not start"},
        )
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        (failure("ACQ.SYSTEM_ERROR"), ProviderUnavailableError, None),
        (failure("isp.unknow-error", code="20000"), ProviderUnavailableError, None),
        (failure("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"), ProviderRejectedError,
         "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"),
        (failure("ACQ.TRADE_STATUS_ERROR"), ProviderRejectedError, "ACQ.TRADE_STATUS_ERROR"),
        (failure("ACQ.DISCORDANT_REPEAT_REQUEST"), ProviderRejectedError,
         "ACQ.DISCORDANT_REPEAT_REQUEST"),
        (failure("ACQ.SELLER_BALANCE_NOT_ENOUGH"), ProviderRejectedError,
         "ACQ.SELLER_BALANCE_NOT_ENOUGH"),
    ],
)  # fmt: skip
def test_refund_failures_are_translated(
    keys: Keys, answer: dict[str, str], error: type[Exception], code: str | None
) -> None:
    provider, _ = scripted(keys, alipay_trade_refund=[answer])

    with pytest.raises(error) as caught:
        provider.refund(refund_request())

    if code is not None:
        assert isinstance(caught.value, ProviderRejectedError)
        assert caught.value.code == code


@pytest.mark.parametrize(("amount", "key"), [(0, "r-1"), (801, "r-1"), (300, ""), (300, "k" * 65)])
def test_impossible_refunds_are_never_sent(keys: Keys, amount: int, key: str) -> None:
    provider, gateway = scripted(keys)

    with pytest.raises(ValueError, match="refund"):
        provider.refund(refund_request(amount, key))

    assert gateway.seen == []


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (
            {**OK, "out_trade_no": "a1", "out_request_no": "r-0001", "total_amount": "8.00",
             "refund_amount": "3.00", "refund_status": "REFUND_SUCCESS"},
            RefundOutcome("r-0001", RefundState.SUCCESS, 300, None),
        ),
        (
            {**OK, "out_trade_no": "a1", "out_request_no": "r-0001", "refund_amount": "3.00"},
            RefundOutcome("r-0001", RefundState.SUCCESS, 300, None),
        ),
        (
            {**OK, "trade_no": "2026030122001400000000000001", "out_trade_no": "a1"},
            RefundOutcome("r-0001", RefundState.NOT_FOUND, 0, None),
        ),
        (failure("ACQ.TRADE_NOT_EXIST"), RefundOutcome("r-0001", RefundState.NOT_FOUND, 0, None)),
    ],
    ids=["refund-success", "older-answer-without-status", "no-refund-data", "no-trade"],
)  # fmt: skip
def test_query_refund_maps_refund_data(
    keys: Keys, answer: dict[str, str], outcome: RefundOutcome
) -> None:
    provider, gateway = scripted(keys, alipay_trade_fastpay_refund_query=[answer])

    assert provider.query_refund("a1", "r-0001") == outcome
    assert gateway.seen == [
        (
            "alipay.trade.fastpay.refund.query",
            {"out_trade_no": "a1", "out_request_no": "r-0001", "query_options": ["gmt_refund_pay"]},
        )
    ]


def test_fetch_bill_follows_the_link_and_parses_the_zip(keys: Keys) -> None:
    url = "https://dwbillcenter.example.test/downloadBillFile.resource?token=abc"
    provider, gateway = scripted(
        keys, alipay_data_dataservice_bill_downloadurl_query=[{**OK, "bill_download_url": url}]
    )
    gateway.files[url] = zip_of_detail(
        "支付宝交易号,商户订单号,业务类型,完成时间,订单金额（元）,退款批次号/请求号,服务费（元）\r\n"
        "t-1\t,o-1\t,交易,2026-03-01 08:00:00,8.00,,-0.05\r\n"
    )

    entries = provider.fetch_bill(date(2026, 3, 1))

    assert entries == [
        BillEntry(BillEntryKind.PAYMENT, "o-1", "t-1", None, 800, 5,
                  datetime(2026, 3, 1, 0, 0, tzinfo=UTC))
    ]  # fmt: skip
    assert gateway.seen == [
        (
            "alipay.data.dataservice.bill.downloadurl.query",
            {"bill_type": "trade", "bill_date": "2026-03-01"},
        ),
        (f"GET {url}", {}),
    ]


def test_a_day_without_a_bill_is_empty(keys: Keys) -> None:
    provider, gateway = scripted(
        keys,
        alipay_data_dataservice_bill_downloadurl_query=[failure("isp.bill_not_exist")],
    )

    assert provider.fetch_bill(date(2026, 3, 1)) == []
    assert len(gateway.seen) == 1


def zip_of_detail(text: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        bundle.writestr("2021000000000001_20260301_业务明细.csv", text.encode("gbk"))
    return buffer.getvalue()

"""The Alipay OpenAPI gateway's server side, for demos and tests.

Same wire format and real RSA2 as `openapi.alipay.com/gateway.do`: requests are
verified with the registered app's public key over the received values, every
answer is `{"<method>_response":{…},"sign":"…"}` signed with the emulator's own
Alipay key over the exact inner text, and payments are notified by form POST
on Alipay's retry schedule until the merchant answers `success`.

当面付 semantics kept on purpose: a precreated trade does not exist until the
guest scans the QR (query and close answer ACQ.TRADE_NOT_EXIST), and its
`timeout_express` counts from the scan.
"""

import asyncio
import dataclasses
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Self, TypeVar
from urllib.parse import parse_qsl, urlencode

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from roompay.clock import Clock
from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import Fen, parse_yuan, yuan_str
from roompay.payments.alipay.client import (
    beijing_timestamp,
    parse_beijing_timestamp,
    request_sign_content,
)
from roompay.payments.alipay.constants import (
    API_VERSION,
    BEIJING,
    BILL_TYPE_TRADE,
    CHARSET_UTF8,
    CODE_MESSAGES,
    ERROR_RESPONSE_KEY,
    FORMAT_JSON,
    FUND_CHANGE_NO,
    FUND_CHANGE_YES,
    MAX_OUT_REQUEST_NO_LEN,
    MAX_OUT_TRADE_NO_LEN,
    MAX_REFUND_REASON_LEN,
    MAX_SUBJECT_LEN,
    MAX_TIMEOUT_MINUTES,
    NOTIFY_REPLY_OK,
    NOTIFY_TYPE_TRADE_STATUS_SYNC,
    REFUND_STATUS_SUCCESS,
    SIGN_TYPE_RSA2,
    BillBusinessType,
    Code,
    Method,
    SubCode,
    TradeStatus,
    response_key,
)
from roompay.payments.alipay.notify import notify_sign_content
from roompay.payments.crypto import (
    generate_private_key,
    load_private_key,
    load_public_key,
    private_key_pem,
    public_key_pem,
    sign_b64,
    verify_b64,
)
from roompay.sandbox.alipay_bill import BillLine, bill_zip, service_fee
from roompay.sandbox.faults import FaultKind, Faults, RefundMode
from roompay.sandbox.notifier import ALIPAY_RETRY_DELAYS_S, Notification, Notifier

STATE_FILE = "alipay.json"
# Generous: some SDKs stamp naive local time, which is off by hours outside China,
# but a quarter of an hour still catches a replayed or forged old request.
TIMESTAMP_TOLERANCE = timedelta(minutes=15)
# How long an unscanned dynamic QR stays scannable; Alipay documents "about 2 h".
QR_LIFETIME = timedelta(hours=2)
DEFAULT_TIMEOUT_EXPRESS = "15d"
MIN_TOTAL_FEN: Fen = 1
MAX_TOTAL_FEN: Fen = 100_000_000 * 100
# The bill download link is valid for 30 s, as Alipay's.
BILL_LINK_LIFETIME = timedelta(seconds=30)
PROVIDER = "alipay"  # the name faults are armed under
NOTIFY_CONTENT_TYPE = "application/x-www-form-urlencoded; charset=utf-8"
RESPONSE_MEDIA_TYPE = "application/json;charset=utf-8"

_BARE_500 = "<html><body><h1>500 Internal Server Error</h1></body></html>"
_TIMEOUT_EXPRESS = re.compile(r"(?P<count>[1-9][0-9]*)(?P<unit>[mhd])|1c")
_ModelT = TypeVar("_ModelT", bound=BaseModel)
_UNIT_MINUTES = {"m": 1, "h": 60, "d": 24 * 60}
_REQUIRED_PARAMS: tuple[tuple[str, SubCode], ...] = (
    ("app_id", SubCode.MISSING_APP_ID),
    ("method", SubCode.MISSING_METHOD),
    ("sign_type", SubCode.MISSING_SIGNATURE_TYPE),
    ("sign", SubCode.MISSING_SIGNATURE),
    ("timestamp", SubCode.MISSING_TIMESTAMP),
    ("version", SubCode.MISSING_VERSION),
)


def _digits(count: int) -> str:
    return f"{secrets.randbelow(10**count):0{count}d}"


class GatewayError(Exception):
    """A request the gateway answers with a non-10000 code."""

    def __init__(
        self, code: Code, sub_code: SubCode, sub_msg: str, *, gateway_level: bool = False
    ) -> None:
        super().__init__(f"{code} {sub_code}: {sub_msg}")
        self.code = code
        self.sub_code = sub_code
        self.sub_msg = sub_msg
        # Failures before a method runs come back as `error_response`.
        self.gateway_level = gateway_level

    def body(self) -> dict[str, str]:
        """Render the response object."""
        return {
            "code": self.code,
            "msg": CODE_MESSAGES[self.code],
            "sub_code": self.sub_code,
            "sub_msg": self.sub_msg,
        }


def _business_error(sub_code: SubCode, sub_msg: str) -> GatewayError:
    return GatewayError(Code.BUSINESS_FAILED, sub_code, sub_msg)


def _amount_text(value: object) -> object:
    # SDKs also send total_amount as a JSON number; biz_content is parsed with
    # Decimal so that such numbers keep their exact digits.
    if isinstance(value, Decimal | int) and not isinstance(value, bool):
        return str(value)
    return value


class _Biz(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PrecreateBiz(_Biz):
    """The `biz_content` of `alipay.trade.precreate`."""

    out_trade_no: str = Field(min_length=1, max_length=MAX_OUT_TRADE_NO_LEN)
    total_amount: Annotated[str, BeforeValidator(_amount_text)]
    subject: str = Field(min_length=1, max_length=MAX_SUBJECT_LEN)
    body: str | None = None
    timeout_express: str = DEFAULT_TIMEOUT_EXPRESS

    @model_validator(mode="after")
    def _check(self) -> Self:
        fen = self.amount_fen  # raises ValueError on a malformed amount
        if not MIN_TOTAL_FEN <= fen <= MAX_TOTAL_FEN:
            raise ValueError(f"total_amount {self.total_amount} is outside [0.01, 100000000]")
        timeout_minutes(self.timeout_express)
        return self

    @property
    def amount_fen(self) -> Fen:
        """The total amount in fen."""
        if not re.fullmatch(r"[0-9]+(\.[0-9]{1,2})?", self.total_amount):
            raise ValueError(f"total_amount {self.total_amount!r} is not yuan with 2 decimals")
        try:
            return parse_yuan(self.total_amount)
        except InvalidAmountError as exc:
            raise ValueError(str(exc)) from exc


class TradeRefBiz(_Biz):
    """The `biz_content` of query and close: `trade_no` or `out_trade_no` (trade_no wins)."""

    out_trade_no: str | None = None
    trade_no: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not (self.out_trade_no or self.trade_no):
            raise ValueError("out_trade_no or trade_no is required")
        return self


def _yuan_fen(text: str, name: str) -> Fen:
    if not re.fullmatch(r"[0-9]+(\.[0-9]{1,2})?", text):
        raise ValueError(f"{name} {text!r} is not yuan with 2 decimals")
    try:
        return parse_yuan(text)
    except InvalidAmountError as exc:
        raise ValueError(str(exc)) from exc


class RefundBiz(TradeRefBiz):
    """The `biz_content` of `alipay.trade.refund`; `out_request_no` defaults to out_trade_no."""

    refund_amount: Annotated[str, BeforeValidator(_amount_text)]
    out_request_no: str | None = Field(default=None, max_length=MAX_OUT_REQUEST_NO_LEN)
    refund_reason: str | None = Field(default=None, max_length=MAX_REFUND_REASON_LEN)

    @model_validator(mode="after")
    def _check_amount(self) -> Self:
        if not MIN_TOTAL_FEN <= self.amount_fen <= MAX_TOTAL_FEN:
            raise ValueError(f"refund_amount {self.refund_amount} is outside [0.01, 100000000]")
        return self

    @property
    def amount_fen(self) -> Fen:
        """The refund amount in fen."""
        return _yuan_fen(self.refund_amount, "refund_amount")


class RefundQueryBiz(TradeRefBiz):
    """The `biz_content` of `alipay.trade.fastpay.refund.query`."""

    out_request_no: str = Field(min_length=1, max_length=MAX_OUT_REQUEST_NO_LEN)
    query_options: list[str] = Field(default_factory=list)


class BillBiz(_Biz):
    """The `biz_content` of `alipay.data.dataservice.bill.downloadurl.query`."""

    bill_type: str
    bill_date: str

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.bill_type != BILL_TYPE_TRADE:
            raise ValueError(f"bill_type {self.bill_type!r}: only trade bills are emulated")
        self.day  # noqa: B018 - raises ValueError unless the date is yyyy-MM-dd
        return self

    @property
    def day(self) -> date:
        """The bill's day (daily bills only; monthly ones are not emulated)."""
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", self.bill_date):
            raise ValueError(f"bill_date {self.bill_date!r} is not yyyy-MM-dd")
        return date.fromisoformat(self.bill_date)


def timeout_minutes(express: str) -> int | None:
    """Parse `timeout_express` ("90m", "2h", "15d") into minutes; None for "1c" (today)."""
    match = _TIMEOUT_EXPRESS.fullmatch(express)
    if match is None:
        raise ValueError(f"timeout_express {express!r} is not like 5m, 2h, 1d or 1c")
    if match["count"] is None:
        return None
    minutes = int(match["count"]) * _UNIT_MINUTES[match["unit"]]
    if minutes > MAX_TIMEOUT_MINUTES:
        raise ValueError(f"timeout_express {express!r} is longer than 15d")
    return minutes


def _deadline(scanned_at: datetime, express: str) -> datetime:
    minutes = timeout_minutes(express)
    if minutes is not None:
        return scanned_at + timedelta(minutes=minutes)
    local = scanned_at.astimezone(BEIJING)
    return local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


class _MerchantRecord(BaseModel):
    app_id: str
    seller_id: str
    public_key_pem: str


class _StateFile(BaseModel):
    alipay_private_key_pem: str
    merchants: list[_MerchantRecord]


class _Registration(BaseModel):
    public_key_pem: str


@dataclass(slots=True)
class _Trade:
    app_id: str
    seller_id: str
    out_trade_no: str
    amount_fen: Fen
    subject: str
    body: str | None
    timeout_express: str
    notify_url: str | None
    qr_code: str
    created_at: datetime
    status: TradeStatus | None = None  # None: precreated, not scanned, unknown to queries
    trade_no: str = ""
    buyer_id: str = ""
    buyer_logon_id: str = ""
    scanned_at: datetime | None = None
    paid_at: datetime | None = None
    closed_reason: str = ""
    refunds: dict[str, "_Refund"] = field(default_factory=dict)  # by out_request_no

    @property
    def refunded_fen(self) -> Fen:
        """Everything refunded so far."""
        return sum(refund.amount_fen for refund in self.refunds.values())


@dataclass(slots=True)
class _Refund:
    out_request_no: str
    amount_fen: Fen
    reason: str
    refunded_at: datetime
    fee_back_fen: Fen  # the part of the payment's fee this refund gives back
    hidden_queries: int = 0  # refund queries still to answer "no refund data" (PROCESSING)


@dataclass(frozen=True, slots=True)
class _BillFile:
    name: str
    content: bytes
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class GatewayReply:
    """The gateway's answer: a response object to sign, or (`body` None) a bare HTTP 500.

    `delay_s` makes the answer late (fault injection: the call was carried out).
    """

    key: str
    body: dict[str, Any] | None
    delay_s: float = 0.0


_MethodHandler = Callable[[_MerchantRecord, dict[str, Any], Mapping[str, str]], dict[str, Any]]


class AlipayEmulator:
    """Alipay's gateway, notify sender and the guest's scan-and-pay, with persisted keys."""

    def __init__(
        self, state_dir: Path, clock: Clock, notifier: Notifier, faults: Faults | None = None
    ) -> None:
        self._path = state_dir / STATE_FILE
        self._clock = clock
        self._notifier = notifier
        self._faults = faults if faults is not None else Faults()
        self._bills: dict[str, _BillFile] = {}
        self._merchants: dict[str, _MerchantRecord] = {}
        self._merchant_keys: dict[str, rsa.RSAPublicKey] = {}
        self._trades: dict[tuple[str, str], _Trade] = {}
        self._by_qr: dict[str, _Trade] = {}
        self._key = self._load_or_create()

    # --- persistence ---------------------------------------------------------

    def _load_or_create(self) -> rsa.RSAPrivateKey:
        if not self._path.exists():
            key = generate_private_key()
            self._save(key)
            return key
        state = _StateFile.model_validate_json(self._path.read_text(encoding="utf-8"))
        for merchant in state.merchants:
            self._add_merchant(merchant)
        return load_private_key(state.alipay_private_key_pem)

    def _save(self, key: rsa.RSAPrivateKey) -> None:
        state = _StateFile(
            alipay_private_key_pem=private_key_pem(key),
            merchants=list(self._merchants.values()),
        )
        self._path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._path.with_suffix(".json.tmp")
        # The file holds a private key: owner-only, and replaced atomically.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(state.model_dump_json(indent=2))
        os.replace(temporary, self._path)

    def _add_merchant(self, merchant: _MerchantRecord) -> None:
        self._merchant_keys[merchant.app_id] = load_public_key(merchant.public_key_pem)
        self._merchants[merchant.app_id] = merchant

    # --- merchants -----------------------------------------------------------

    @property
    def alipay_public_key_pem(self) -> str:
        """The emulator's Alipay public key, to verify its responses and notifies."""
        return public_key_pem(self._key)

    def register_merchant(self, public_key_pem: str) -> dict[str, str]:
        """Register an app by its RSA public key; return app_id, seller_id and Alipay's key."""
        try:
            load_public_key(public_key_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"public_key_pem is not an RSA public key in PEM: {exc}") from exc
        app_id = "2021" + _digits(12)
        while app_id in self._merchants:
            app_id = "2021" + _digits(12)
        merchant = _MerchantRecord(
            app_id=app_id, seller_id="2088" + _digits(12), public_key_pem=public_key_pem
        )
        self._add_merchant(merchant)
        self._save(self._key)
        return {
            "app_id": merchant.app_id,
            "seller_id": merchant.seller_id,
            "public_key_pem": self.alipay_public_key_pem,
        }

    # --- HTTP ----------------------------------------------------------------

    def router(self) -> APIRouter:
        """Routes relative to the emulator's base: `/merchants`, `/gateway.do`, `/bill/{token}`."""
        router = APIRouter()
        router.add_api_route(
            "/merchants", self._merchants_route, methods=["POST"], include_in_schema=False
        )
        router.add_api_route(
            "/gateway.do", self._gateway_route, methods=["GET", "POST"], include_in_schema=False
        )
        router.add_api_route(
            "/bill/{token}", self._bill_route, methods=["GET"], include_in_schema=False
        )
        return router

    async def _merchants_route(self, request: Request) -> JSONResponse:
        try:
            registration = _Registration.model_validate_json(await request.body())
            created = self.register_merchant(registration.public_key_pem)
        except ValidationError:
            message = 'expected a JSON body {"public_key_pem": "-----BEGIN PUBLIC KEY-----…"}'
            return JSONResponse({"error": "invalid_request", "message": message}, 400)
        except ValueError as exc:
            return JSONResponse({"error": "invalid_public_key", "message": str(exc)}, 400)
        return JSONResponse(created, 201)

    async def _gateway_route(self, request: Request) -> Response:
        try:
            params = await _merged_params(request)
        except GatewayError as exc:
            return self._signed_response(ERROR_RESPONSE_KEY, exc.body())
        # The bill link points next to the gateway, wherever the emulator is mounted.
        base_url = str(request.url.replace(query="")).rsplit("/", 1)[0]
        reply = self.handle(params, base_url)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.body is None:
            return Response(_BARE_500, 500, media_type="text/html")
        return self._signed_response(reply.key, reply.body)

    async def _bill_route(self, token: str) -> Response:
        bill = self._bills.get(token)
        if bill is None or self._clock.now() > bill.expires_at:
            return Response("the bill link is unknown or has expired", 404)
        return Response(
            bill.content,
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{bill.name}"'},
        )

    def _signed_response(self, key: str, body: Mapping[str, object]) -> Response:
        # Sign the inner text first, then splice it in, so the signed bytes are
        # exactly what the client slices out, followed directly by the sign.
        inner = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        sign = sign_b64(self._key, inner.encode("utf-8"))
        text = "{" + json.dumps(key) + ":" + inner + ',"sign":' + json.dumps(sign) + "}"
        return Response(content=text.encode("utf-8"), media_type=RESPONSE_MEDIA_TYPE)

    # --- gateway -------------------------------------------------------------

    def handle(self, params: Mapping[str, str], base_url: str = "") -> GatewayReply:
        """Authenticate one gateway call, take its armed fault and run its method.

        `base_url` is where the emulator is mounted (for the bill download link).
        Faults are taken only by authentic calls of an emulated method: SYSTEM_ERROR
        answers 20000 isp.unknow-error and does nothing, HTTP_500 answers a bare 500
        and does nothing, SLOW does the work and answers `slow_s` late.
        """
        method = params.get("method", "")
        handlers: dict[str, _MethodHandler] = {
            Method.PRECREATE: self._precreate,
            Method.QUERY: self._query,
            Method.CLOSE: self._close,
            Method.REFUND: self._refund,
            Method.REFUND_QUERY: self._refund_query,
            Method.BILL_DOWNLOAD_URL: lambda merchant, raw, _: self._bill_download_url(
                merchant, raw, base_url
            ),
        }
        delay_s = 0.0
        try:
            merchant = self._authenticate(params)
            handler = handlers.get(method)
            if handler is None:
                raise GatewayError(
                    Code.BUSINESS_FAILED,
                    SubCode.INVALID_METHOD,
                    f"method {method!r} does not exist or is not emulated; "
                    f"supported: {', '.join(sorted(handlers))}",
                    gateway_level=True,
                )
            fault = self._faults.take(PROVIDER, method)
            if fault is FaultKind.HTTP_500:
                return GatewayReply(response_key(method), None)
            if fault is FaultKind.SYSTEM_ERROR:
                raise GatewayError(Code.UNKNOWN_ERROR, SubCode.UNKNOWN_ERROR, "系统繁忙")
            if fault is FaultKind.SLOW:
                delay_s = self._faults.slow_s
            body = handler(merchant, _biz_content(params), params)
        except GatewayError as exc:
            key = ERROR_RESPONSE_KEY if exc.gateway_level else response_key(method)
            return GatewayReply(key, exc.body(), delay_s)
        return GatewayReply(response_key(method), body, delay_s)

    def _authenticate(self, params: Mapping[str, str]) -> _MerchantRecord:
        for name, sub_code in _REQUIRED_PARAMS:
            if not params.get(name):
                raise GatewayError(
                    Code.MISSING_PARAMETER, sub_code, f"缺少必选参数 {name}", gateway_level=True
                )
        _check_param(params, "sign_type", SIGN_TYPE_RSA2, SubCode.INVALID_SIGNATURE_TYPE)
        _check_param(params, "charset", CHARSET_UTF8, SubCode.INVALID_CHARSET)
        _check_param(params, "format", FORMAT_JSON, SubCode.INVALID_FORMAT)
        merchant = self._merchants.get(params["app_id"])
        if merchant is None:
            raise _invalid(SubCode.INVALID_APP_ID, f"无效的AppID参数: {params['app_id']}")
        content = request_sign_content(params)
        key = self._merchant_keys[merchant.app_id]
        if not verify_b64(key, content.encode("utf-8"), params["sign"]):
            raise _invalid(
                SubCode.INVALID_SIGNATURE,
                "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配，"
                f"网关生成的验签字符串为：{content}",
            )
        self._check_timestamp(params["timestamp"])
        return merchant

    def _check_timestamp(self, text: str) -> None:
        try:
            stamp = parse_beijing_timestamp(text)
        except ValueError as exc:
            raise _invalid(
                SubCode.INVALID_TIMESTAMP, f"timestamp {text!r} is not yyyy-MM-dd HH:mm:ss"
            ) from exc
        now = self._clock.now()
        if abs(stamp - now) > TIMESTAMP_TOLERANCE:
            raise _invalid(
                SubCode.INVALID_TIMESTAMP,
                f"timestamp {text} is more than 15 minutes from Beijing time "
                f"{beijing_timestamp(now)}",
            )

    # --- methods -------------------------------------------------------------

    def _precreate(
        self, merchant: _MerchantRecord, raw: dict[str, Any], params: Mapping[str, str]
    ) -> dict[str, Any]:
        biz = _validate(PrecreateBiz, raw)
        existing = self._trades.get((merchant.app_id, biz.out_trade_no))
        if existing is not None:
            return self._repeat_precreate(existing, biz)
        trade = _Trade(
            app_id=merchant.app_id,
            seller_id=merchant.seller_id,
            out_trade_no=biz.out_trade_no,
            amount_fen=biz.amount_fen,
            subject=biz.subject,
            body=biz.body,
            timeout_express=biz.timeout_express,
            notify_url=params.get("notify_url") or None,
            qr_code="https://qr.alipay.com/bax0" + secrets.token_hex(11),
            created_at=self._clock.now(),
        )
        self._trades[(trade.app_id, trade.out_trade_no)] = trade
        self._by_qr[trade.qr_code] = trade
        return _success(out_trade_no=trade.out_trade_no, qr_code=trade.qr_code)

    def _repeat_precreate(self, trade: _Trade, biz: PrecreateBiz) -> dict[str, Any]:
        self._refresh(trade)
        if trade.status in (TradeStatus.TRADE_SUCCESS, TradeStatus.TRADE_FINISHED):
            raise _business_error(SubCode.TRADE_HAS_SUCCESS, "交易已被支付")
        if trade.status is TradeStatus.TRADE_CLOSED:
            raise _business_error(SubCode.TRADE_HAS_CLOSE, "交易已经关闭")
        # The amount and subject make the trade; a recomputed timeout on a retry does not.
        if (trade.amount_fen, trade.subject, trade.body) != (biz.amount_fen, biz.subject, biz.body):
            raise _business_error(
                SubCode.CONTEXT_INCONSISTENT,
                f"交易信息被篡改: out_trade_no {trade.out_trade_no} was created with "
                "another amount or subject",
            )
        return _success(out_trade_no=trade.out_trade_no, qr_code=trade.qr_code)

    def _query(
        self, merchant: _MerchantRecord, raw: dict[str, Any], params: Mapping[str, str]
    ) -> dict[str, Any]:
        del params  # query takes no common params beyond authentication
        trade = self._scanned_trade(merchant, _validate(TradeRefBiz, raw))
        paid = trade.status in (TradeStatus.TRADE_SUCCESS, TradeStatus.TRADE_FINISHED)
        paid_text = yuan_str(trade.amount_fen) if paid else "0.00"
        answer = _success(
            trade_no=trade.trade_no,
            out_trade_no=trade.out_trade_no,
            buyer_logon_id=trade.buyer_logon_id,
            buyer_user_id=trade.buyer_id,
            trade_status=trade.status,
            total_amount=yuan_str(trade.amount_fen),
            receipt_amount=paid_text,
            buyer_pay_amount=paid_text,
            invoice_amount=paid_text,
            point_amount="0.00",
        )
        if paid:
            answer["fund_bill_list"] = [{"fund_channel": "ALIPAYACCOUNT", "amount": paid_text}]
        if trade.paid_at is not None:  # a fully refunded, closed trade keeps its pay date
            answer["send_pay_date"] = beijing_timestamp(trade.paid_at)
        return answer

    def _close(
        self, merchant: _MerchantRecord, raw: dict[str, Any], params: Mapping[str, str]
    ) -> dict[str, Any]:
        del params  # close takes no common params beyond authentication
        trade = self._scanned_trade(merchant, _validate(TradeRefBiz, raw))
        if trade.status is not TradeStatus.WAIT_BUYER_PAY:
            raise _business_error(
                SubCode.TRADE_STATUS_ERROR, f"交易状态不合法: the trade is {trade.status}"
            )
        trade.status = TradeStatus.TRADE_CLOSED
        trade.closed_reason = "closed by the merchant"
        return _success(trade_no=trade.trade_no, out_trade_no=trade.out_trade_no)

    def _refund(
        self, merchant: _MerchantRecord, raw: dict[str, Any], params: Mapping[str, str]
    ) -> dict[str, Any]:
        """Refund at once (Alipay refunds are synchronous); the key makes repeats idempotent."""
        del params
        biz = _validate(RefundBiz, raw)
        trade = self._scanned_trade(merchant, biz)
        key = biz.out_request_no or trade.out_trade_no
        existing = trade.refunds.get(key)
        if existing is not None:
            if existing.amount_fen != biz.amount_fen:
                raise _business_error(
                    SubCode.DISCORDANT_REPEAT_REQUEST,
                    f"请求信息不一致: out_request_no {key} was a refund of "
                    f"{yuan_str(existing.amount_fen)}",
                )
            return self._refund_answer(trade, existing, FUND_CHANGE_NO)
        if trade.paid_at is None:
            raise _business_error(
                SubCode.TRADE_STATUS_ERROR, f"交易状态不合法: the trade is {trade.status}"
            )
        refunded = trade.refunded_fen
        if refunded + biz.amount_fen > trade.amount_fen:
            raise _business_error(
                SubCode.REFUND_AMT_NOT_EQUAL_TOTAL,
                f"退款金额超限: {yuan_str(refunded)} of {yuan_str(trade.amount_fen)} "
                f"already refunded, {biz.refund_amount} more asked",
            )
        mode = self._faults.refunds(PROVIDER)
        if mode is RefundMode.ABNORMAL:
            # Refunds are synchronous: a refund that cannot be paid back is refused.
            raise _business_error(SubCode.SELLER_BALANCE_NOT_ENOUGH, "卖家余额不足")
        fee = service_fee(trade.amount_fen)
        refund = _Refund(
            out_request_no=key,
            amount_fen=biz.amount_fen,
            reason=biz.refund_reason or "",
            refunded_at=self._clock.now(),
            fee_back_fen=min(service_fee(refunded + biz.amount_fen), fee) - service_fee(refunded),
            hidden_queries=(
                self._faults.processing_queries if mode is RefundMode.PROCESSING else 0
            ),
        )
        trade.refunds[key] = refund
        if trade.refunded_fen == trade.amount_fen:
            trade.status = TradeStatus.TRADE_CLOSED
            trade.closed_reason = "fully refunded"
        return self._refund_answer(trade, refund, FUND_CHANGE_YES)

    @staticmethod
    def _refund_answer(trade: _Trade, refund: _Refund, fund_change: str) -> dict[str, Any]:
        return _success(
            trade_no=trade.trade_no,
            out_trade_no=trade.out_trade_no,
            buyer_logon_id=trade.buyer_logon_id,
            buyer_user_id=trade.buyer_id,
            fund_change=fund_change,
            refund_fee=yuan_str(trade.refunded_fen),  # cumulative
            gmt_refund_pay=beijing_timestamp(refund.refunded_at),
            send_back_fee=yuan_str(refund.amount_fen),
        )

    def _refund_query(
        self, merchant: _MerchantRecord, raw: dict[str, Any], params: Mapping[str, str]
    ) -> dict[str, Any]:
        """Answer a refund query; 10000 without refund data means "not refunded"."""
        del params
        biz = _validate(RefundQueryBiz, raw)
        trade = self._scanned_trade(merchant, biz)
        refund = trade.refunds.get(biz.out_request_no)
        if refund is None or refund.hidden_queries > 0:
            if refund is not None:
                refund.hidden_queries -= 1  # PROCESSING: "query again at least 10 s later"
            return _success(trade_no=trade.trade_no, out_trade_no=trade.out_trade_no)
        answer = _success(
            trade_no=trade.trade_no,
            out_trade_no=trade.out_trade_no,
            out_request_no=refund.out_request_no,
            total_amount=yuan_str(trade.amount_fen),
            refund_amount=yuan_str(refund.amount_fen),
            refund_status=REFUND_STATUS_SUCCESS,
        )
        if refund.reason:
            answer["refund_reason"] = refund.reason
        if "gmt_refund_pay" in biz.query_options:
            answer["gmt_refund_pay"] = beijing_timestamp(refund.refunded_at)
        return answer

    def _bill_download_url(
        self, merchant: _MerchantRecord, raw: dict[str, Any], base_url: str
    ) -> dict[str, Any]:
        """Make the day's trade bill and hand out a 30-second link to it."""
        biz = _validate(BillBiz, raw)
        now = self._clock.now()
        if biz.day >= now.astimezone(BEIJING).date():
            raise GatewayError(
                Code.BUSINESS_FAILED,
                SubCode.BILL_NOT_EXIST,
                f"账单不存在: the bill of {biz.bill_date} is ready the next day",
            )
        lines = self._bill_lines(merchant.app_id, biz.day)
        if not lines:
            raise GatewayError(Code.BUSINESS_FAILED, SubCode.BILL_NOT_EXIST, "账单不存在")
        self._bills = {t: b for t, b in self._bills.items() if b.expires_at >= now}
        token = secrets.token_urlsafe(24)
        self._bills[token] = _BillFile(
            name=f"{merchant.app_id}_{biz.day.strftime('%Y%m%d')}.csv.zip",
            content=bill_zip(merchant.app_id, merchant.seller_id, biz.day, lines, now),
            expires_at=now + BILL_LINK_LIFETIME,
        )
        return _success(bill_download_url=f"{base_url}/bill/{token}")

    def _bill_lines(self, app_id: str, day: date) -> list[BillLine]:
        def on_day(moment: datetime) -> bool:
            return moment.astimezone(BEIJING).date() == day

        lines: list[BillLine] = []
        for trade in self._trades.values():
            if trade.app_id != app_id or trade.paid_at is None:
                continue
            template = BillLine(
                trade_no=trade.trade_no,
                out_trade_no=trade.out_trade_no,
                business_type=BillBusinessType.PAYMENT,
                subject=trade.subject,
                created_at=trade.scanned_at or trade.created_at,
                finished_at=trade.paid_at,
                buyer_logon_id=trade.buyer_logon_id,
                amount_fen=trade.amount_fen,
                refund_request_no="",
                fee_fen=-service_fee(trade.amount_fen),
            )
            if on_day(trade.paid_at):
                lines.append(template)
            lines.extend(
                dataclasses.replace(
                    template,
                    business_type=BillBusinessType.REFUND,
                    finished_at=refund.refunded_at,
                    amount_fen=-refund.amount_fen,
                    refund_request_no=refund.out_request_no,
                    fee_fen=refund.fee_back_fen,
                    remark=refund.reason,
                )
                for refund in trade.refunds.values()
                if on_day(refund.refunded_at)
            )
        return sorted(lines, key=lambda line: line.finished_at)

    def _scanned_trade(self, merchant: _MerchantRecord, ref: TradeRefBiz) -> _Trade:
        trade: _Trade | None
        if ref.trade_no:
            trade = next(
                (
                    t
                    for t in self._trades.values()
                    if t.app_id == merchant.app_id and t.trade_no == ref.trade_no
                ),
                None,
            )
        else:
            trade = self._trades.get((merchant.app_id, ref.out_trade_no or ""))
        # A precreated trade is unknown to Alipay until the guest scans its QR.
        if trade is None or trade.status is None:
            raise _business_error(SubCode.TRADE_NOT_EXIST, "交易不存在")
        self._refresh(trade)
        return trade

    def _refresh(self, trade: _Trade) -> None:
        if trade.status is not TradeStatus.WAIT_BUYER_PAY or trade.scanned_at is None:
            return
        if self._clock.now() >= _deadline(trade.scanned_at, trade.timeout_express):
            trade.status = TradeStatus.TRADE_CLOSED
            trade.closed_reason = f"timed out ({trade.timeout_express} after the scan)"

    # --- the guest -----------------------------------------------------------

    def owns_qr(self, qr: str) -> bool:
        """Tell whether this QR content is one of this emulator's precreated trades."""
        return qr in self._by_qr

    def scan(self, qr: str) -> None:
        """Scan the QR as a guest: the trade now exists, as WAIT_BUYER_PAY."""
        trade = self._by_qr.get(qr)
        if trade is None:
            raise ValueError(f"unknown Alipay QR code {qr!r}")
        if trade.status is not None:
            return  # scanning again changes nothing
        now = self._clock.now()
        if now - trade.created_at > QR_LIFETIME:
            raise ValueError(f"the QR code of {trade.out_trade_no} has expired")
        trade.status = TradeStatus.WAIT_BUYER_PAY
        trade.trade_no = now.astimezone(BEIJING).strftime("%Y%m%d") + _digits(20)
        trade.buyer_id = "2088" + _digits(12)
        trade.buyer_logon_id = "gue***@example.com"
        trade.scanned_at = now

    async def guest_pay(self, qr: str, notify_amount_fen: int | None = None) -> dict[str, str]:
        """Scan if needed and pay as the guest; then notify the merchant in the background.

        `notify_amount_fen` is fault injection: the signed notify claims that amount.
        """
        self.scan(qr)
        trade = self._by_qr[qr]
        self._refresh(trade)
        if trade.status is TradeStatus.TRADE_CLOSED:
            raise ValueError(f"trade {trade.out_trade_no} is closed: {trade.closed_reason}")
        if trade.status is not TradeStatus.WAIT_BUYER_PAY:
            raise ValueError(f"trade {trade.out_trade_no} is already paid")
        paid_at = self._clock.now()
        trade.status = TradeStatus.TRADE_SUCCESS
        trade.paid_at = paid_at
        if trade.notify_url:
            notification = self._payment_notification(
                trade, trade.notify_url, paid_at, notify_amount_fen
            )
            self._notifier.send(notification, ALIPAY_RETRY_DELAYS_S)
        return {
            "provider": "alipay",
            "out_trade_no": trade.out_trade_no,
            "trade_no": trade.trade_no,
        }

    def _payment_notification(
        self, trade: _Trade, notify_url: str, paid_at: datetime, amount_fen: int | None = None
    ) -> Notification:
        amount = yuan_str(trade.amount_fen if amount_fen is None else amount_fen)
        fields = {
            "notify_time": beijing_timestamp(self._clock.now()),
            "notify_type": NOTIFY_TYPE_TRADE_STATUS_SYNC,
            "notify_id": secrets.token_hex(16),
            "app_id": trade.app_id,
            "charset": CHARSET_UTF8,
            "version": API_VERSION,
            "sign_type": SIGN_TYPE_RSA2,
            "trade_no": trade.trade_no,
            "out_trade_no": trade.out_trade_no,
            "buyer_id": trade.buyer_id,
            "buyer_logon_id": trade.buyer_logon_id,
            "seller_id": trade.seller_id,
            "trade_status": str(trade.status),
            "total_amount": amount,
            "receipt_amount": amount,
            "buyer_pay_amount": amount,
            "invoice_amount": amount,
            "point_amount": "0.00",
            "subject": trade.subject,
            "gmt_create": beijing_timestamp(trade.scanned_at or paid_at),
            "gmt_payment": beijing_timestamp(paid_at),
            "fund_bill_list": json.dumps(
                [{"amount": amount, "fundChannel": "ALIPAYACCOUNT"}], separators=(",", ":")
            ),
        }
        if trade.body:
            fields["body"] = trade.body
        fields["sign"] = sign_b64(self._key, notify_sign_content(fields).encode("utf-8"))
        return Notification(
            url=notify_url,
            body=urlencode(fields).encode("ascii"),
            headers={"Content-Type": NOTIFY_CONTENT_TYPE},
            accepted=_is_success_reply,
        )


def _is_success_reply(response: Any) -> bool:
    # Alipay resends on anything but the 7 bytes `success`.
    return bool(response.content == NOTIFY_REPLY_OK.encode())


def _success(**fields: Any) -> dict[str, Any]:
    return {"code": Code.SUCCESS, "msg": CODE_MESSAGES[Code.SUCCESS], **fields}


def _invalid(sub_code: SubCode, sub_msg: str) -> GatewayError:
    return GatewayError(Code.INVALID_PARAMETER, sub_code, sub_msg, gateway_level=True)


def _check_param(params: Mapping[str, str], name: str, expected: str, sub_code: SubCode) -> None:
    value = params.get(name)
    if value and value.lower() != expected.lower():
        raise _invalid(sub_code, f"{name} must be {expected}, got {value!r}")


def _biz_content(params: Mapping[str, str]) -> dict[str, Any]:
    text = params.get("biz_content", "")
    try:
        biz = json.loads(text, parse_float=Decimal) if text else {}
    except ValueError as exc:
        message = f"biz_content is not JSON: {exc}"
        raise _business_error(SubCode.INVALID_BIZ_PARAMETER, message) from exc
    if not isinstance(biz, dict):
        raise _business_error(SubCode.INVALID_BIZ_PARAMETER, "biz_content is not a JSON object")
    return biz


def _validate(model: type[_ModelT], raw: Mapping[str, Any]) -> _ModelT:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'biz_content'}: {error['msg']}"
            for error in exc.errors()
        )
        raise _business_error(SubCode.INVALID_BIZ_PARAMETER, f"参数无效: {problems}") from exc


async def _merged_params(request: Request) -> dict[str, str]:
    """Merge the query string and, for a form POST, the body; the body wins on repeats."""
    params = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if request.method == "POST" and content_type.startswith("application/x-www-form-urlencoded"):
        try:
            text = (await request.body()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _invalid(SubCode.INVALID_CHARSET, "the form body is not UTF-8") from exc
        params.update(parse_qsl(text, keep_blank_values=True))
    return params

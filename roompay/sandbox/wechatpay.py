"""The WeChat Pay API v3 gateway, emulated: same wire format, real cryptography.

Serves any merchant software, as stripe-mock does. Mounted below a prefix (the
demo uses `/sandbox/wechatpay`); signatures cover the path from `/v3/` on, as the
real gateway sees it, so an unmodified client only changes its base URL.

Merchants and the platform key persist as JSON under `state_dir` so that a
restarted demo keeps working; trades, refunds and bills live in memory only (a
restart forgets them), guarded by nothing more than the event loop: every handler
is `async def` and changes state before its first `await`.

Faults (`sandbox.faults`) are taken per operation after authentication: `native`,
`query`, `close`, `refund`, `refund_query`, `tradebill`, `billdownload`.
"""

import asyncio
import csv
import gzip
import hashlib
import io
import json
import os
import secrets
import string
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Request, Response
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
)

from roompay.clock import Clock
from roompay.domain.money import parse_yuan, yuan_str
from roompay.payments import crypto
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay import wire
from roompay.sandbox.faults import FaultKind, Faults, RefundMode
from roompay.sandbox.notifier import WECHAT_RETRY_DELAYS_S, Notification, Notifier

STATE_FILE = "wechatpay.json"
PROVIDER = "wechatpay"
# Without time_expire an unpaid Native order becomes unpayable after 7 days (§1.3).
DEFAULT_ORDER_LIFETIME = timedelta(days=7)
# The sandbox merchant's fee: 0.6 % of each payment, given back pro rata on refunds.
FEE_RATE = Decimal("0.006")
FEE_RATE_TEXT = "0.60%"
_ALNUM = string.ascii_letters + string.digits


def _random_chars(length: int, alphabet: str = _ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def _random_digits(length: int) -> str:
    return _random_chars(length, string.digits)


def _unix(moment: datetime) -> str:
    return str(int(moment.timestamp()))


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(c.CHINA_TZ).isoformat(timespec="seconds")


class ApiError(Exception):
    """A gateway error answered as a signed `{"code","message"}` body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _param_error(exc: ValidationError | ValueError) -> ApiError:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return ApiError(400, c.ErrorCode.PARAM_ERROR, f"{where}: {first['msg']}")
    return ApiError(400, c.ErrorCode.PARAM_ERROR, str(exc))


# --- request models: the gateway's own validation -----------------------------------

OutTradeNo = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z_\-*]{6,32}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class AmountIn(_Strict):
    """`amount` of a Native order: integer fen, CNY only."""

    total: StrictInt = Field(gt=0)
    currency: Literal["CNY"] = "CNY"


class NativeOrderIn(_Strict):
    """The body of `POST /v3/pay/transactions/native` (§1.3)."""

    appid: str = Field(min_length=1, max_length=32)
    mchid: str = Field(min_length=1, max_length=32)
    description: str = Field(min_length=1, max_length=c.DESCRIPTION_MAX_CHARS)
    out_trade_no: OutTradeNo
    time_expire: AwareDatetime | None = None
    attach: str | None = Field(default=None, max_length=c.ATTACH_MAX_CHARS)
    notify_url: str = Field(min_length=1, max_length=256)
    amount: AmountIn

    @field_validator("notify_url")
    @classmethod
    def _callback_url(cls, value: str) -> str:
        # The real gateway wants HTTPS; the sandbox also takes http:// for loopback demos.
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("notify_url must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("notify_url must not carry a query string")
        return value


class CloseIn(_Strict):
    """The body of `POST .../out-trade-no/{out_trade_no}/close`."""

    mchid: str = Field(min_length=1)


OutRefundNo = Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z_\-|*@]{1,64}$")]


class RefundAmountIn(_Strict):
    """`amount` of a refund: integer fen, CNY only (`from` is not emulated)."""

    refund: StrictInt = Field(gt=0)
    total: StrictInt = Field(gt=0)
    currency: Literal["CNY"]


class RefundIn(_Strict):
    """The body of `POST /v3/refund/domestic/refunds` (§1.7)."""

    transaction_id: str | None = Field(default=None, min_length=1, max_length=32)
    out_trade_no: OutTradeNo | None = None
    out_refund_no: OutRefundNo
    reason: str | None = Field(default=None, max_length=c.REFUND_REASON_MAX_CHARS)
    notify_url: str | None = Field(default=None, max_length=256)
    funds_account: str | None = None
    amount: RefundAmountIn


class TradeBillQuery(_Strict):
    """The query of `GET /v3/bill/tradebill` (§1.8)."""

    bill_date: date
    bill_type: Literal["ALL", "SUCCESS", "REFUND"] = "ALL"
    tar_type: Literal["GZIP"] | None = None

    @field_validator("bill_date", mode="before")
    @classmethod
    def _strict_date(cls, value: object) -> object:
        if not isinstance(value, str) or len(value) != 10:
            raise ValueError("bill_date must be YYYY-MM-DD")
        return value


class MerchantIn(BaseModel):
    """The body of the sandbox's own `POST /merchants`."""

    public_key_pem: str = Field(min_length=1)


# --- state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Merchant:
    """A registered merchant and its request-signing public key."""

    mchid: str
    appid: str
    serial_no: str
    apiv3_key: str
    public_key_pem: str
    public_key: rsa.RSAPublicKey = field(compare=False, repr=False)

    def to_json(self) -> dict[str, str]:
        """Return what persists of the merchant."""
        return {
            "mchid": self.mchid,
            "appid": self.appid,
            "serial_no": self.serial_no,
            "apiv3_key": self.apiv3_key,
            "public_key_pem": self.public_key_pem,
        }

    @classmethod
    def from_json(cls, data: dict[str, str]) -> "Merchant":
        """Rebuild a merchant from its persisted form."""
        return cls(**data, public_key=crypto.load_public_key(data["public_key_pem"]))


_Answer = tuple[int, dict[str, Any] | None] | Response
_Handler = Callable[[Merchant, Request, bytes], _Answer]


class State(StrEnum):
    """The trade states a Native order reaches in the sandbox."""

    NOTPAY = "NOTPAY"
    SUCCESS = "SUCCESS"
    REFUND = "REFUND"  # 转入退款: paid, then at least one refund succeeded
    CLOSED = "CLOSED"


_STATE_DESC = {
    State.NOTPAY: "订单未支付",
    State.SUCCESS: "支付成功",
    State.REFUND: "转入退款",
    State.CLOSED: "订单已关闭",
}
_PAID = (State.SUCCESS, State.REFUND)


def fee_fen(amount_fen: int) -> int:
    """The provider's fee on an amount: 0.6 %, rounded half up to whole fen."""
    return int((Decimal(amount_fen) * FEE_RATE).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass
class Refund:
    """One refund as the gateway keeps it."""

    mchid: str
    out_trade_no: str
    transaction_id: str
    out_refund_no: str
    refund_id: str
    refund_fen: int
    total_fen: int
    create_time: datetime
    status: c.WireRefundStatus
    queries_until_success: int = 0
    success_time: datetime | None = None
    notify_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Render the refund object of the refund API and of its query (§1.7)."""
        data: dict[str, Any] = {
            "refund_id": self.refund_id,
            "out_refund_no": self.out_refund_no,
            "transaction_id": self.transaction_id,
            "out_trade_no": self.out_trade_no,
            "channel": "ORIGINAL",
            "user_received_account": "支付用户零钱",
            "create_time": _rfc3339(self.create_time),
            "status": self.status.value,
            "funds_account": "AVAILABLE",
            "amount": {
                "total": self.total_fen,
                "refund": self.refund_fen,
                "from": [],
                "payer_total": self.total_fen,
                "payer_refund": self.refund_fen,
                "settlement_refund": self.refund_fen,
                "settlement_total": self.total_fen,
                "discount_refund": 0,
                "currency": c.CURRENCY_CNY,
            },
            "promotion_detail": [],
        }
        if self.success_time is not None:
            data["success_time"] = _rfc3339(self.success_time)
        return data


@dataclass
class Trade:
    """One Native order as the gateway keeps it."""

    order: NativeOrderIn
    code_url: str
    expires_at: datetime
    state: State = State.NOTPAY
    transaction_id: str | None = None
    success_time: datetime | None = None
    openid: str | None = None
    refunds: list[Refund] = field(default_factory=list)

    @property
    def refunded_fen(self) -> int:
        """What the refunds of this trade take back (accepted ones, whatever their end)."""
        return sum(refund.refund_fen for refund in self.refunds)

    def to_json(self) -> dict[str, Any]:
        """Render the transaction object of the query API and of notifies (§1.4)."""
        order = self.order
        data: dict[str, Any] = {
            "appid": order.appid,
            "mchid": order.mchid,
            "out_trade_no": order.out_trade_no,
            "trade_type": c.TRADE_TYPE_NATIVE,
            "trade_state": self.state.value,
            "trade_state_desc": _STATE_DESC[self.state],
            "attach": order.attach or "",
            "amount": {"total": order.amount.total, "payer_currency": c.CURRENCY_CNY},
        }
        if self.state in _PAID and self.success_time is not None:
            data |= {
                "transaction_id": self.transaction_id,
                "bank_type": "OTHERS",
                "success_time": _rfc3339(self.success_time),
                "payer": {"openid": self.openid},
                "amount": {
                    "total": order.amount.total,
                    "payer_total": order.amount.total,
                    "currency": c.CURRENCY_CNY,
                    "payer_currency": c.CURRENCY_CNY,
                },
            }
        return data


def _accepted(response: httpx.Response) -> bool:
    # The HTTP status decides, not the body (§1.6).
    return response.status_code in (200, 204)


class WechatPayEmulator:
    """The provider's side of WeChat Pay API v3 Native, plus the guest's actions."""

    def __init__(
        self, state_dir: Path, clock: Clock, notifier: Notifier, faults: Faults | None = None
    ) -> None:
        self._path = state_dir / STATE_FILE
        self._clock = clock
        self._notifier = notifier
        self._faults = faults if faults is not None else Faults()
        self._merchants: dict[str, Merchant] = {}
        self._trades: dict[tuple[str, str], Trade] = {}
        self._by_code_url: dict[str, tuple[str, str]] = {}
        self._refunds: dict[tuple[str, str], Refund] = {}
        self._bills: dict[str, tuple[str, bytes]] = {}  # token -> (mchid, file bytes)
        state_dir.mkdir(parents=True, exist_ok=True)
        if self._path.exists():
            self._load()
        else:
            self._platform_key = crypto.generate_private_key()
            self.public_key_id = "PUB_KEY_ID_" + _random_digits(28)
            self._save()

    # --- persistence ---------------------------------------------------------------

    def _load(self) -> None:
        data = json.loads(self._path.read_text(encoding="utf-8"))
        self._platform_key = crypto.load_private_key(data["platform_private_key_pem"])
        self.public_key_id = data["public_key_id"]
        for item in data["merchants"]:
            merchant = Merchant.from_json(item)
            self._merchants[merchant.mchid] = merchant

    def _save(self) -> None:
        data = {
            "platform_private_key_pem": crypto.private_key_pem(self._platform_key),
            "public_key_id": self.public_key_id,
            "merchants": [m.to_json() for m in self._merchants.values()],
        }
        # Private keys: owner-only from the first byte; write then rename, so that a
        # crash never leaves half a key file.
        temporary = self._path.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
        os.replace(temporary, self._path)

    # --- merchants -------------------------------------------------------------------

    @property
    def platform_public_key_pem(self) -> str:
        """The platform public key merchants verify responses and notifies with."""
        return crypto.public_key_pem(self._platform_key)

    def register_merchant(self, public_key_pem: str) -> dict[str, str]:
        """Register a merchant's public key; return what the provider hands the merchant."""
        try:
            public_key = crypto.load_public_key(public_key_pem)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"public_key_pem is not an RSA public key: {exc}") from exc
        mchid = "19" + _random_digits(8)
        while mchid in self._merchants:
            mchid = "19" + _random_digits(8)
        merchant = Merchant(
            mchid=mchid,
            appid="wx" + secrets.token_hex(8),
            serial_no=secrets.token_hex(20).upper(),
            apiv3_key=_random_chars(c.APIV3_KEY_LENGTH),
            public_key_pem=public_key_pem,
            public_key=public_key,
        )
        self._merchants[mchid] = merchant
        self._save()
        return {
            "mchid": merchant.mchid,
            "appid": merchant.appid,
            "serial_no": merchant.serial_no,
            "apiv3_key": merchant.apiv3_key,
            "public_key_pem": self.platform_public_key_pem,
            "public_key_id": self.public_key_id,
        }

    # --- HTTP ------------------------------------------------------------------------

    def router(self) -> APIRouter:
        """Return the gateway's routes, relative to the emulator's base URL."""
        router = APIRouter()

        @router.post("/merchants", status_code=201)
        async def register(request: Request) -> Response:
            try:
                payload = MerchantIn.model_validate_json(await request.body())
                answer = self.register_merchant(payload.public_key_pem)
            except (ValidationError, ValueError) as exc:
                return _json_response(400, _error_body(_param_error(exc)))
            return _json_response(201, answer)

        operations: list[tuple[str, str, str, _Handler]] = [
            ("POST", c.PATH_NATIVE, "native", self._create_native),
            ("GET", c.PATH_QUERY_BY_OUT_TRADE_NO, "query", self._query),
            ("POST", c.PATH_CLOSE, "close", self._close),
            ("POST", c.PATH_REFUND, "refund", self._refund),
            ("GET", c.PATH_REFUND_QUERY, "refund_query", self._query_refund),
            ("GET", c.PATH_TRADE_BILL, "tradebill", self._trade_bill),
            ("GET", c.PATH_BILL_DOWNLOAD, "billdownload", self._download_bill),
        ]
        for method, path, operation, handler in operations:
            router.add_api_route(
                path, self._endpoint(operation, handler), methods=[method], name=operation
            )
        return router

    def _endpoint(
        self, operation: str, handler: _Handler
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, operation, handler)

        return endpoint

    async def _serve(self, request: Request, operation: str, handler: _Handler) -> Response:
        body = await request.body()
        fault: FaultKind | None = None
        try:
            merchant = self._authenticate(request, body)
            fault = self._faults.take(PROVIDER, operation)
            if fault == FaultKind.HTTP_500:
                # A front server failing before the gateway: bare, unsigned.
                return Response("Internal Server Error", 500, media_type="text/plain")
            if fault == FaultKind.SYSTEM_ERROR:
                raise ApiError(500, c.ErrorCode.SYSTEM_ERROR, "系统错误")
            answer = handler(merchant, request, body)
        except ApiError as err:
            answer = (err.status, _error_body(err))
        if fault == FaultKind.SLOW:
            # Done, but the answer is late: the client times out and must retry safely.
            await asyncio.sleep(self._faults.slow_s)
        return answer if isinstance(answer, Response) else self._signed(*answer)

    def _authenticate(self, request: Request, body: bytes) -> Merchant:
        try:
            auth = wire.parse_authorization(request.headers.get("authorization", ""))
        except ValueError as exc:
            raise ApiError(401, c.ErrorCode.SIGN_ERROR, str(exc)) from exc
        merchant = self._merchants.get(auth.mchid)
        if merchant is None or merchant.serial_no != auth.serial_no:
            raise ApiError(401, c.ErrorCode.SIGN_ERROR, "unknown mchid or serial_no")
        try:
            wire.check_timestamp(auth.timestamp, self._clock.now())
        except ValueError as exc:
            raise ApiError(401, c.ErrorCode.SIGN_ERROR, str(exc)) from exc
        try:
            signed_url = _signed_url(request)
        except ValueError as exc:
            raise ApiError(401, c.ErrorCode.SIGN_ERROR, str(exc)) from exc
        message = wire.request_message(
            request.method, signed_url, auth.timestamp, auth.nonce_str, body
        )
        if not crypto.verify_b64(merchant.public_key, message, auth.signature):
            raise ApiError(401, c.ErrorCode.SIGN_ERROR, "signature does not verify")
        return merchant

    def _signed(self, status: int, answer: dict[str, Any] | None) -> Response:
        body = b"" if answer is None else _dump(answer)
        headers = wire.platform_signature_headers(
            self._platform_key,
            self.public_key_id,
            _unix(self._clock.now()),
            _random_chars(32),
            body,
        )
        headers[c.HEADER_REQUEST_ID] = secrets.token_hex(16)
        media_type = None if answer is None else "application/json"
        return Response(content=body, status_code=status, headers=headers, media_type=media_type)

    # --- API operations --------------------------------------------------------------

    def _create_native(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        del request  # the operation needs only the authenticated body
        try:
            order = NativeOrderIn.model_validate_json(body)
        except ValidationError as exc:
            raise _param_error(exc) from exc
        if order.mchid != merchant.mchid or order.appid != merchant.appid:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "mchid and appid do not match")
        now = self._clock.now()
        if order.time_expire is not None and order.time_expire <= now:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "time_expire is in the past")
        key = (merchant.mchid, order.out_trade_no)
        existing = self._trades.get(key)
        if existing is not None:
            return 200, {"code_url": _repeat(existing, order)}
        code_url = c.CODE_URL_PREFIX + secrets.token_urlsafe(12)
        self._trades[key] = Trade(
            order=order,
            code_url=code_url,
            expires_at=order.time_expire or now + DEFAULT_ORDER_LIFETIME,
        )
        self._by_code_url[code_url] = key
        return 200, {"code_url": code_url}

    def _query(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        del body  # GET
        if request.query_params.get("mchid") != merchant.mchid:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "mchid does not match")
        return 200, self._trade(merchant, request).to_json()

    def _close(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        try:
            payload = CloseIn.model_validate_json(body)
        except ValidationError as exc:
            raise _param_error(exc) from exc
        if payload.mchid != merchant.mchid:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "mchid does not match")
        trade = self._trade(merchant, request)
        if trade.state in _PAID:
            raise ApiError(400, c.ErrorCode.ORDERPAID, "订单已支付")
        if trade.state == State.CLOSED:
            raise ApiError(400, c.ErrorCode.ORDER_CLOSED, "订单已关闭")
        trade.state = State.CLOSED
        return 204, None

    def _trade(self, merchant: Merchant, request: Request) -> Trade:
        out_trade_no = request.path_params["out_trade_no"]
        trade = self._trades.get((merchant.mchid, out_trade_no))
        if trade is None:
            raise ApiError(404, c.ErrorCode.ORDER_NOT_EXIST, "订单不存在")
        return trade

    def _refund(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        """Accept a refund; the same out_refund_no again is the same refund, never a second."""
        del request  # the operation needs only the authenticated body
        try:
            payload = RefundIn.model_validate_json(body)
        except ValidationError as exc:
            raise _param_error(exc) from exc
        trade = self._refunded_trade(merchant, payload)
        amount = payload.amount
        existing = self._refunds.get((merchant.mchid, payload.out_refund_no))
        if existing is not None:
            same = (existing.out_trade_no, existing.refund_fen, existing.total_fen) == (
                trade.order.out_trade_no,
                amount.refund,
                amount.total,
            )
            if not same:
                raise ApiError(
                    400, c.ErrorCode.INVALID_REQUEST, "out_refund_no is used by another refund"
                )
            return 200, existing.to_json()
        if trade.state not in _PAID or trade.transaction_id is None:
            raise ApiError(400, c.ErrorCode.INVALID_REQUEST, "trade not paid")
        if amount.total != trade.order.amount.total:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "amount.total is not the order total")
        if trade.refunded_fen + amount.refund > amount.total:
            raise ApiError(403, c.ErrorCode.NOT_ENOUGH, "退款金额超过订单可退金额")
        now = self._clock.now()
        mode = self._faults.refunds(PROVIDER)
        refund = Refund(
            mchid=merchant.mchid,
            out_trade_no=trade.order.out_trade_no,
            transaction_id=trade.transaction_id,
            out_refund_no=payload.out_refund_no,
            # 50 + 10 digits + the CST date + 9 digits: the shape of real refund ids.
            refund_id=f"50{_random_digits(10)}{_cst_date(now)}{_random_digits(9)}",
            refund_fen=amount.refund,
            total_fen=amount.total,
            create_time=now,
            status=_REFUND_START[mode],
            queries_until_success=self._faults.processing_queries,
            notify_url=payload.notify_url,
        )
        trade.refunds.append(refund)
        self._refunds[(merchant.mchid, refund.out_refund_no)] = refund
        if refund.status == c.WireRefundStatus.SUCCESS:
            self._refund_succeeded(trade, refund, now)
        elif refund.status == c.WireRefundStatus.ABNORMAL:
            self._notify_refund(refund)
        return 200, refund.to_json()

    def _refunded_trade(self, merchant: Merchant, payload: RefundIn) -> Trade:
        if payload.out_trade_no is not None:
            trade = self._trades.get((merchant.mchid, payload.out_trade_no))
        elif payload.transaction_id is not None:
            trade = next(
                (
                    t
                    for (mchid, _), t in self._trades.items()
                    if mchid == merchant.mchid and t.transaction_id == payload.transaction_id
                ),
                None,
            )
        else:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "out_trade_no or transaction_id needed")
        if trade is None:
            raise ApiError(404, c.ErrorCode.RESOURCE_NOT_EXISTS, "订单不存在")
        return trade

    def _refund_succeeded(self, trade: Trade, refund: Refund, now: datetime) -> None:
        refund.status = c.WireRefundStatus.SUCCESS
        refund.success_time = now
        trade.state = State.REFUND
        self._notify_refund(refund)

    def _notify_refund(self, refund: Refund) -> None:
        """Send the `REFUND.*` notify to the refund's notify_url, if it named one (§1.7)."""
        if refund.notify_url is None:
            return
        merchant = self._merchants[refund.mchid]
        resource = {
            "mchid": refund.mchid,
            "out_trade_no": refund.out_trade_no,
            "transaction_id": refund.transaction_id,
            "out_refund_no": refund.out_refund_no,
            "refund_id": refund.refund_id,
            "refund_status": refund.status.value,
            "user_received_account": "支付用户零钱",
            "amount": {
                "total": refund.total_fen,
                "refund": refund.refund_fen,
                "payer_total": refund.total_fen,
                "payer_refund": refund.refund_fen,
            },
        }
        if refund.success_time is not None:
            resource["success_time"] = _rfc3339(refund.success_time)
        nonce = _random_chars(c.AEAD_NONCE_LENGTH)
        envelope = {
            "id": "EV-" + _random_digits(20),
            "create_time": _rfc3339(self._clock.now()),
            "resource_type": c.RESOURCE_TYPE_ENCRYPTED,
            "event_type": c.EVENT_REFUND_PREFIX + refund.status.value,
            "summary": "退款状态变更",
            "resource": {
                "original_type": c.ORIGINAL_TYPE_REFUND,
                "algorithm": c.AEAD_ALGORITHM,
                "ciphertext": wire.encrypt_resource(
                    merchant.apiv3_key, nonce, c.ORIGINAL_TYPE_REFUND, _dump(resource)
                ),
                "associated_data": c.ORIGINAL_TYPE_REFUND,
                "nonce": nonce,
            },
        }
        body = _dump(envelope)
        notification = Notification(
            url=refund.notify_url,
            body=body,
            headers=self.sign_notify(body),
            accepted=_accepted,
            resign=self.sign_notify,
        )
        self._notifier.send(notification, WECHAT_RETRY_DELAYS_S)

    def _query_refund(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        """Answer a refund query; a PROCESSING refund succeeds after enough queries."""
        del body  # GET
        out_refund_no = request.path_params["out_refund_no"]
        refund = self._refunds.get((merchant.mchid, out_refund_no))
        if refund is None:
            raise ApiError(404, c.ErrorCode.RESOURCE_NOT_EXISTS, "退款单不存在")
        if refund.status == c.WireRefundStatus.PROCESSING:
            refund.queries_until_success -= 1
            if refund.queries_until_success <= 0:
                trade = self._trades[(merchant.mchid, refund.out_trade_no)]
                self._refund_succeeded(trade, refund, self._clock.now())
        return 200, refund.to_json()

    # --- bills -----------------------------------------------------------------------

    def _trade_bill(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        """Make the day's bill from the gateway's own records and hand out its URL."""
        del body  # GET
        try:
            query = TradeBillQuery.model_validate(dict(request.query_params))
        except ValidationError as exc:
            raise _param_error(exc) from exc
        lines = self.bill_lines(merchant.mchid, query.bill_date, query.bill_type)
        if not lines:
            raise ApiError(400, c.ErrorCode.NO_STATEMENT_EXIST, "当日无账单")
        content = render_trade_bill(lines)
        digest = hashlib.sha1(content, usedforsecurity=False).hexdigest()
        stored = gzip.compress(content, mtime=0) if query.tar_type == c.TAR_TYPE_GZIP else content
        token = secrets.token_urlsafe(24)
        self._bills[token] = (merchant.mchid, stored)
        url = f"{_gateway_base(request)}{c.PATH_BILL_DOWNLOAD}?token={token}"
        return 200, {"hash_type": c.HASH_TYPE_SHA1, "hash_value": digest, "download_url": url}

    def _download_bill(self, merchant: Merchant, request: Request, body: bytes) -> _Answer:
        """Stream a bill file: raw bytes, unsigned, as the real gateway sends them."""
        del body  # GET
        stored = self._bills.get(request.query_params.get("token", ""))
        if stored is None or stored[0] != merchant.mchid:
            raise ApiError(400, c.ErrorCode.INVALID_REQUEST, "token is invalid or expired")
        return Response(stored[1], 200, media_type="application/octet-stream")

    def bill_lines(self, mchid: str, bill_date: date, bill_type: str = "ALL") -> list[list[str]]:
        """The cells of one merchant's bill lines for a Beijing-time day, by time."""
        dated: list[tuple[datetime, list[str]]] = []
        for (owner, _), trade in self._trades.items():
            if owner != mchid or trade.state not in _PAID or trade.success_time is None:
                continue
            if bill_type != c.BILL_STATE_REFUND and _cst_day(trade.success_time) == bill_date:
                dated.append((trade.success_time, _payment_line(trade, trade.success_time)))
            for refund in trade.refunds:
                moment = refund.success_time
                if (
                    bill_type != c.BILL_STATE_SUCCESS
                    and moment is not None
                    and _cst_day(moment) == bill_date
                ):
                    dated.append((moment, _refund_line(trade, refund, moment)))
        dated.sort(key=lambda item: item[0])
        return [line for _, line in dated]

    # --- the guest -------------------------------------------------------------------

    def owns_qr(self, qr: str) -> bool:
        """Tell whether a QR's content is the code_url of one of this sandbox's trades."""
        return qr in self._by_code_url

    async def guest_pay(self, qr: str, notify_amount_fen: int | None = None) -> dict[str, str]:
        """Pay the trade behind a code_url and send the merchant its payment notify.

        `notify_amount_fen` is fault injection: the signed notify claims that amount.
        """
        key = self._by_code_url.get(qr)
        if key is None:
            raise ValueError("unknown WeChat Pay code_url (the sandbox forgets trades on restart)")
        trade = self._trades[key]
        now = self._clock.now()
        if trade.state in _PAID:
            raise ValueError(f"order {trade.order.out_trade_no} is already paid")
        if trade.state == State.CLOSED:
            raise ValueError(f"order {trade.order.out_trade_no} is closed")
        if now >= trade.expires_at:
            raise ValueError(f"order {trade.order.out_trade_no} expired at {trade.expires_at}")
        trade.state = State.SUCCESS
        trade.success_time = now
        # 4200 + 6 digits + the CST date + 10 digits: the shape of real transaction ids.
        trade.transaction_id = f"4200{_random_digits(6)}{_cst_date(now)}{_random_digits(10)}"
        trade.openid = "o" + _random_chars(27)
        self._notifier.send(self._payment_notify(trade, notify_amount_fen), WECHAT_RETRY_DELAYS_S)
        return {
            "provider": "wechatpay",
            "out_trade_no": trade.order.out_trade_no,
            "transaction_id": trade.transaction_id,
        }

    def _payment_notify(self, trade: Trade, amount_fen: int | None = None) -> Notification:
        merchant = self._merchants[trade.order.mchid]
        now = self._clock.now()
        nonce = _random_chars(c.AEAD_NONCE_LENGTH)
        transaction = trade.to_json()
        if amount_fen is not None:
            transaction["amount"] = {
                **transaction["amount"],
                "total": amount_fen,
                "payer_total": amount_fen,
            }
        plaintext = _dump(transaction)
        envelope = {
            "id": "EV-" + _random_digits(20),
            "create_time": _rfc3339(now),
            "resource_type": c.RESOURCE_TYPE_ENCRYPTED,
            "event_type": c.EVENT_TRANSACTION_SUCCESS,
            "summary": "支付成功",
            "resource": {
                "original_type": c.ORIGINAL_TYPE_TRANSACTION,
                "algorithm": c.AEAD_ALGORITHM,
                "ciphertext": wire.encrypt_resource(
                    merchant.apiv3_key, nonce, c.ORIGINAL_TYPE_TRANSACTION, plaintext
                ),
                "associated_data": c.ORIGINAL_TYPE_TRANSACTION,
                "nonce": nonce,
            },
        }
        body = _dump(envelope)
        return Notification(
            url=trade.order.notify_url,
            body=body,
            headers=self.sign_notify(body),
            accepted=_accepted,
            resign=self.sign_notify,
        )

    def sign_notify(self, body: bytes) -> dict[str, str]:
        """Sign a notify body now, as each delivery attempt is signed afresh."""
        headers = wire.platform_signature_headers(
            self._platform_key,
            self.public_key_id,
            _unix(self._clock.now()),
            _random_chars(32),
            body,
        )
        headers[c.HEADER_REQUEST_ID] = secrets.token_hex(16)
        headers["Content-Type"] = "application/json"
        return headers


def _repeat(existing: Trade, order: NativeOrderIn) -> str:
    """Answer a repeated order: the same code_url only for the same parameters."""
    if existing.order != order:
        raise ApiError(400, c.ErrorCode.OUT_TRADE_NO_USED, "商户订单号重复")
    if existing.state in _PAID:
        raise ApiError(400, c.ErrorCode.ORDERPAID, "订单已支付")
    if existing.state == State.CLOSED:
        raise ApiError(400, c.ErrorCode.ORDER_CLOSED, "订单已关闭")
    return existing.code_url


_REFUND_START = {
    RefundMode.SUCCESS: c.WireRefundStatus.SUCCESS,
    RefundMode.PROCESSING: c.WireRefundStatus.PROCESSING,
    RefundMode.ABNORMAL: c.WireRefundStatus.ABNORMAL,
}


def _cst_day(moment: datetime) -> date:
    return moment.astimezone(c.CHINA_TZ).date()


def _cst_date(moment: datetime) -> str:
    return moment.astimezone(c.CHINA_TZ).strftime("%Y%m%d")


def _bill_time(moment: datetime) -> str:
    return moment.astimezone(c.CHINA_TZ).strftime(c.BILL_TIME_FORMAT)


def _payment_line(trade: Trade, moment: datetime) -> list[str]:
    order = trade.order
    total = order.amount.total
    cells = {
        "交易时间": _bill_time(moment),
        "公众账号ID": order.appid,
        "商户号": order.mchid,
        "特约商户号": "0",
        "设备号": "",
        "微信订单号": trade.transaction_id or "",
        "商户订单号": order.out_trade_no,
        "用户标识": trade.openid or "",
        "交易类型": c.TRADE_TYPE_NATIVE,
        "交易状态": c.BILL_STATE_SUCCESS,
        "付款银行": "OTHERS",
        "货币种类": c.CURRENCY_CNY,
        "应结订单金额": yuan_str(total),
        "代金券金额": yuan_str(0),
        "微信退款单号": "0",
        "商户退款单号": "0",
        "退款金额": yuan_str(0),
        "充值券退款金额": yuan_str(0),
        "退款类型": "",
        "退款状态": "",
        "商品名称": order.description,
        "商户数据包": order.attach or "",
        "手续费": yuan_str(fee_fen(total)),
        "费率": FEE_RATE_TEXT,
        "订单金额": yuan_str(total),
        "申请退款金额": yuan_str(0),
        "费率备注": "",
    }
    return [cells[name] for name in c.TRADE_BILL_ALL_COLUMNS]


def _refund_line(trade: Trade, refund: Refund, moment: datetime) -> list[str]:
    cells = dict(zip(c.TRADE_BILL_ALL_COLUMNS, _payment_line(trade, moment), strict=True))
    cells |= {
        "交易状态": c.BILL_STATE_REFUND,
        "应结订单金额": yuan_str(0),
        "微信退款单号": refund.refund_id,
        "商户退款单号": refund.out_refund_no,
        "退款金额": yuan_str(refund.refund_fen),
        "退款类型": "ORIGINAL",
        "退款状态": c.WireRefundStatus.SUCCESS.value,
        "手续费": yuan_str(-fee_fen(refund.refund_fen)),
        "订单金额": yuan_str(0),
        "申请退款金额": yuan_str(refund.refund_fen),
    }
    return [cells[name] for name in c.TRADE_BILL_ALL_COLUMNS]


def render_trade_bill(lines: Iterable[list[str]]) -> bytes:
    """Write a trade bill as the provider does: header, backticked cells, then totals."""
    rows = list(lines)
    index = {name: position for position, name in enumerate(c.TRADE_BILL_ALL_COLUMNS)}

    def total(name: str) -> str:
        return yuan_str(sum(parse_yuan(row[index[name]]) for row in rows))

    totals = [
        str(len(rows)),
        total("应结订单金额"),
        total("退款金额"),
        total("充值券退款金额"),
        total("手续费"),
        total("订单金额"),
        total("申请退款金额"),
    ]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(c.TRADE_BILL_ALL_COLUMNS)
    writer.writerows([[c.BILL_CELL_PREFIX + cell for cell in row] for row in rows])
    writer.writerow(c.TRADE_BILL_TOTALS_COLUMNS)
    writer.writerow([c.BILL_CELL_PREFIX + cell for cell in totals])
    return buffer.getvalue().encode("utf-8")


def _gateway_base(request: Request) -> str:
    """The gateway's own absolute base URL: the request URL up to `/v3/`."""
    raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
    prefix = raw_path[: raw_path.find(c.API_PATH_MARKER.encode())].decode("latin-1")
    return f"{request.url.scheme}://{request.url.netloc}{prefix}"


def _signed_url(request: Request) -> str:
    # The raw (still percent-encoded) path, as the client signed it.
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    return wire.canonical_url(raw_path.decode("latin-1"), query.decode("latin-1"))


def _dump(data: dict[str, Any]) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _error_body(err: ApiError) -> dict[str, Any]:
    return {"code": err.code, "message": err.message}


def _json_response(status: int, data: dict[str, Any]) -> Response:
    return Response(content=_dump(data), status_code=status, media_type="application/json")

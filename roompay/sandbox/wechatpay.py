"""The WeChat Pay API v3 gateway, emulated: same wire format, real cryptography.

Serves any merchant software, as stripe-mock does. Mounted below a prefix (the
demo uses `/sandbox/wechatpay`); signatures cover the path from `/v3/` on, as the
real gateway sees it, so an unmodified client only changes its base URL.

Merchants and the platform key persist as JSON under `state_dir` so that a
restarted demo keeps working; trades live in memory only, guarded by nothing
more than the event loop (every handler is `async def`).
"""

import json
import os
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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
from roompay.payments import crypto
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay import wire
from roompay.sandbox.notifier import WECHAT_RETRY_DELAYS_S, Notification, Notifier

STATE_FILE = "wechatpay.json"
# Without time_expire an unpaid Native order becomes unpayable after 7 days (§1.3).
DEFAULT_ORDER_LIFETIME = timedelta(days=7)
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


_Handler = Callable[[Merchant, Request, bytes], tuple[int, dict[str, Any] | None]]


class State(StrEnum):
    """The trade states a Native order reaches in the sandbox."""

    NOTPAY = "NOTPAY"
    SUCCESS = "SUCCESS"
    CLOSED = "CLOSED"


_STATE_DESC = {State.NOTPAY: "订单未支付", State.SUCCESS: "支付成功", State.CLOSED: "订单已关闭"}


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
        if self.state == State.SUCCESS and self.success_time is not None:
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

    def __init__(self, state_dir: Path, clock: Clock, notifier: Notifier) -> None:
        self._path = state_dir / STATE_FILE
        self._clock = clock
        self._notifier = notifier
        self._merchants: dict[str, Merchant] = {}
        self._trades: dict[tuple[str, str], Trade] = {}
        self._by_code_url: dict[str, tuple[str, str]] = {}
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

        @router.post(c.PATH_NATIVE)
        async def native(request: Request) -> Response:
            return await self._serve(request, self._create_native)

        @router.get(c.PATH_QUERY_BY_OUT_TRADE_NO)
        async def query(request: Request) -> Response:
            return await self._serve(request, self._query)

        @router.post(c.PATH_CLOSE)
        async def close(request: Request) -> Response:
            return await self._serve(request, self._close)

        return router

    async def _serve(self, request: Request, handler: _Handler) -> Response:
        body = await request.body()
        try:
            merchant = self._authenticate(request, body)
            status, answer = handler(merchant, request, body)
        except ApiError as err:
            return self._signed(err.status, _error_body(err))
        return self._signed(status, answer)

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

    def _create_native(
        self, merchant: Merchant, request: Request, body: bytes
    ) -> tuple[int, dict[str, Any]]:
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

    def _query(
        self, merchant: Merchant, request: Request, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        del body  # GET
        if request.query_params.get("mchid") != merchant.mchid:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "mchid does not match")
        return 200, self._trade(merchant, request).to_json()

    def _close(self, merchant: Merchant, request: Request, body: bytes) -> tuple[int, None]:
        try:
            payload = CloseIn.model_validate_json(body)
        except ValidationError as exc:
            raise _param_error(exc) from exc
        if payload.mchid != merchant.mchid:
            raise ApiError(400, c.ErrorCode.PARAM_ERROR, "mchid does not match")
        trade = self._trade(merchant, request)
        if trade.state == State.SUCCESS:
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
        if trade.state == State.SUCCESS:
            raise ValueError(f"order {trade.order.out_trade_no} is already paid")
        if trade.state == State.CLOSED:
            raise ValueError(f"order {trade.order.out_trade_no} is closed")
        if now >= trade.expires_at:
            raise ValueError(f"order {trade.order.out_trade_no} expired at {trade.expires_at}")
        trade.state = State.SUCCESS
        trade.success_time = now
        # 4200 + 6 digits + the CST date + 10 digits: the shape of real transaction ids.
        date = now.astimezone(c.CHINA_TZ).strftime("%Y%m%d")
        trade.transaction_id = f"4200{_random_digits(6)}{date}{_random_digits(10)}"
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
            headers=self._notify_headers(body),
            accepted=_accepted,
            resign=self._notify_headers,
        )

    def _notify_headers(self, body: bytes) -> dict[str, str]:
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
    if existing.state == State.SUCCESS:
        raise ApiError(400, c.ErrorCode.ORDERPAID, "订单已支付")
    if existing.state == State.CLOSED:
        raise ApiError(400, c.ErrorCode.ORDER_CLOSED, "订单已关闭")
    return existing.code_url


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

"""The Alipay OpenAPI gateway client: every network call roompay makes to Alipay.

A request is the common params (`app_id, method, format, charset, sign_type,
timestamp, version`, optional `notify_url`) plus `biz_content`, a JSON string.
The sign is RSA2 over "every param except `sign`, empty values dropped, sorted
by key, `k=v` joined with `&`, raw values". The common params travel in the URL
query and `biz_content` in a form-encoded body, as the official SDK sends them.

A response is `{"<method_with_underscores>_response":{…},"sign":"…"}`, signed
by Alipay over the exact text of the inner object, so the client slices that
text out of the raw body instead of re-serializing what it parsed. Errors are
translated here, once, into `roompay.payments.errors`.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roompay.clock import Clock
from roompay.domain.money import Fen, parse_yuan, yuan_str
from roompay.payments.alipay.constants import (
    API_VERSION,
    BEIJING,
    BILL_TYPE_TRADE,
    CHARSET_UTF8,
    ERROR_RESPONSE_KEY,
    FORM_CONTENT_TYPE,
    FORMAT_JSON,
    MAX_TIMEOUT_MINUTES,
    MIN_TIMEOUT_MINUTES,
    REFUND_STATUS_SUCCESS,
    SIGN_TYPE_RSA2,
    Code,
    Method,
    SubCode,
    TradeStatus,
    response_key,
)
from roompay.payments.crypto import load_private_key, load_public_key, sign_b64, verify_b64
from roompay.payments.errors import (
    ProviderRejectedError,
    ProviderSignatureError,
    ProviderUnavailableError,
)

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_ModelT = TypeVar("_ModelT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class AlipayConfig:
    """One merchant app at Alipay; `gateway_url` is the full `…/gateway.do` URL."""

    app_id: str
    seller_id: str
    app_private_key_pem: str
    alipay_public_key_pem: str
    gateway_url: str


def beijing_timestamp(moment: datetime) -> str:
    """Format an aware datetime as Alipay's Beijing-time `yyyy-MM-dd HH:mm:ss`."""
    return moment.astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def parse_beijing_timestamp(text: str) -> datetime:
    """Parse Alipay's `yyyy-MM-dd HH:mm:ss` (Beijing time) into an aware datetime."""
    parsed = datetime.strptime(text, "%Y-%m-%d %H:%M:%S")  # noqa: DTZ007 - zone added below
    return parsed.replace(tzinfo=BEIJING)


def request_sign_content(params: Mapping[str, str]) -> str:
    """Build a request's string to sign: non-empty params but `sign`, sorted, `k=v&…`."""
    kept = sorted((key, value) for key, value in params.items() if key != "sign" and value)
    return "&".join(f"{key}={value}" for key, value in kept)


@dataclass(frozen=True, slots=True)
class SignedResponse:
    """A sync response split into the signed inner object's exact text, its data and sign."""

    key: str
    body_text: str
    body: dict[str, Any]
    sign: str | None


def _skip_whitespace(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


def _expect(text: str, pos: int, char: str) -> int:
    if not text.startswith(char, pos):
        raise ValueError(f"expected {char!r} at offset {pos}")
    return _skip_whitespace(text, pos + 1)


def top_level_members(text: str) -> dict[str, tuple[Any, str]]:
    """Split a JSON object into its members, keeping each value's exact source text."""
    decoder = json.JSONDecoder()
    pos = _expect(text, _skip_whitespace(text, 0), "{")
    members: dict[str, tuple[Any, str]] = {}
    while not text.startswith("}", pos):
        key, pos = decoder.raw_decode(text, pos)
        if not isinstance(key, str) or key in members:
            raise ValueError(f"bad or repeated member name {key!r}")
        pos = _expect(text, _skip_whitespace(text, pos), ":")
        value, end = decoder.raw_decode(text, pos)
        members[key] = (value, text[pos:end])
        pos = _skip_whitespace(text, end)
        if not text.startswith("}", pos):
            pos = _expect(text, pos, ",")
    if _skip_whitespace(text, pos + 1) != len(text):
        raise ValueError("trailing data after the response object")
    return members


def extract_signed_response(text: str, method: str) -> SignedResponse:
    """Find the method's response object (or `error_response`) and its sign in raw text."""
    members = top_level_members(text)
    for key in (response_key(method), ERROR_RESPONSE_KEY):
        if key in members:
            body, body_text = members[key]
            if not isinstance(body, dict):
                raise ValueError(f"{key} is not an object")
            sign = members.get("sign", (None, ""))[0]
            return SignedResponse(key, body_text, body, sign if isinstance(sign, str) else None)
    raise ValueError(f"no {response_key(method)} or {ERROR_RESPONSE_KEY} in the response")


def check_code(body: Mapping[str, Any]) -> None:
    """Raise the matching payment error unless the response object says code 10000."""
    code = str(body.get("code") or "")
    if code == Code.SUCCESS:
        return
    sub_code = str(body.get("sub_code") or "")
    message = str(body.get("sub_msg") or body.get("msg") or "")
    # Both mean "Alipay failed on its side": the same request may be sent again.
    if code == Code.UNKNOWN_ERROR or sub_code in (SubCode.SYSTEM_ERROR, SubCode.UNKNOWN_ERROR):
        raise ProviderUnavailableError(f"Alipay {code} {sub_code}: {message}")
    raise ProviderRejectedError(code=sub_code or code or "missing-code", message=message)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PrecreateResponse(_Response):
    """The `alipay.trade.precreate` answer: the QR content to show the guest."""

    out_trade_no: str
    qr_code: str = Field(min_length=1)


class TradeQueryResponse(_Response):
    """The `alipay.trade.query` answer, once the guest has scanned the QR."""

    trade_no: str
    out_trade_no: str
    trade_status: TradeStatus
    total_amount: str
    buyer_logon_id: str | None = None
    buyer_pay_amount: str | None = None
    receipt_amount: str | None = None
    send_pay_date: str | None = None

    @property
    def total_amount_fen(self) -> Fen:
        """The order amount in fen."""
        return parse_yuan(self.total_amount)


class TradeCloseResponse(_Response):
    """The `alipay.trade.close` answer."""

    trade_no: str | None = None
    out_trade_no: str | None = None


class RefundResponse(_Response):
    """The `alipay.trade.refund` answer; `fund_change` "N" marks an idempotent repeat."""

    trade_no: str
    out_trade_no: str
    fund_change: Literal["Y", "N"]
    refund_fee: str  # cumulative over every refund of the trade
    gmt_refund_pay: str | None = None

    @property
    def money_moved(self) -> bool:
        """Tell whether this very call moved money (False for a repeated out_request_no)."""
        return self.fund_change == "Y"

    @property
    def refund_fee_fen(self) -> Fen:
        """The cumulative refunded amount in fen."""
        return parse_yuan(self.refund_fee)


class RefundQueryResponse(_Response):
    """The `alipay.trade.fastpay.refund.query` answer."""

    trade_no: str | None = None
    out_trade_no: str | None = None
    out_request_no: str | None = None
    total_amount: str | None = None
    refund_amount: str | None = None
    refund_status: str | None = None
    gmt_refund_pay: str | None = None

    @property
    def has_refund_data(self) -> bool:
        """Tell whether the answer describes a refund at all.

        "10000 with no refund data means not refunded": retry the refund with the
        same out_request_no. Older answers carry no `refund_status`, only the amount.
        """
        return bool(self.refund_status or self.refund_amount)

    @property
    def refunded(self) -> bool:
        """Tell whether the refund went through."""
        if self.refund_status:
            return self.refund_status == REFUND_STATUS_SUCCESS
        return bool(self.refund_amount)

    @property
    def refund_amount_fen(self) -> Fen:
        """This refund's amount in fen (0 when the answer has none)."""
        return parse_yuan(self.refund_amount) if self.refund_amount else 0


class BillDownloadUrlResponse(_Response):
    """The bill download URL: a zip of GBK CSVs, valid for 30 s, fetched without auth."""

    bill_download_url: str


class AlipayClient:
    """Signs, sends and verifies Alipay OpenAPI calls for one merchant app."""

    def __init__(
        self,
        config: AlipayConfig,
        clock: Clock,
        http: httpx.Client | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self._config = config
        self._clock = clock
        self._app_key = load_private_key(config.app_private_key_pem)
        self._alipay_key = load_public_key(config.alipay_public_key_pem)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        """Close the HTTP client if this client created it."""
        if self._owns_http:
            self._http.close()

    def signed_params(
        self, method: str, biz_content: Mapping[str, object], notify_url: str | None = None
    ) -> dict[str, str]:
        """Build every request param, `biz_content` and `sign` included."""
        params = {
            "app_id": self._config.app_id,
            "method": method,
            "format": FORMAT_JSON,
            "charset": CHARSET_UTF8,
            "sign_type": SIGN_TYPE_RSA2,
            "timestamp": beijing_timestamp(self._clock.now()),
            "version": API_VERSION,
            "biz_content": json.dumps(biz_content, ensure_ascii=False, separators=(",", ":")),
        }
        if notify_url:
            params["notify_url"] = notify_url
        params["sign"] = sign_b64(self._app_key, request_sign_content(params).encode("utf-8"))
        return params

    def execute(
        self, method: str, biz_content: Mapping[str, object], notify_url: str | None = None
    ) -> dict[str, Any]:
        """Call a gateway method and return its verified, successful response object."""
        query = self.signed_params(method, biz_content, notify_url)
        form = {"biz_content": query.pop("biz_content")}
        response = self._post(query, urlencode(form).encode("ascii"))
        signed = self._parse(method, response)
        if not signed.sign:
            raise ProviderSignatureError(f"{method}: the response carries no sign")
        if not verify_b64(self._alipay_key, signed.body_text.encode("utf-8"), signed.sign):
            raise ProviderSignatureError(f"{method}: the response sign does not verify")
        check_code(signed.body)
        return signed.body

    def _post(self, query: Mapping[str, str], body: bytes) -> httpx.Response:
        try:
            response = self._http.post(
                self._config.gateway_url,
                params=query,
                content=body,
                headers={"Content-Type": FORM_CONTENT_TYPE},
            )
        except httpx.HTTPError as exc:
            raise ProviderUnavailableError(f"Alipay gateway unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise ProviderUnavailableError(f"Alipay gateway answered HTTP {response.status_code}")
        if response.status_code != 200:
            raise ProviderRejectedError(
                code=f"http-{response.status_code}",
                message=response.text[:200],
                status=response.status_code,
            )
        return response

    def download(self, url: str) -> bytes:
        """Fetch a file Alipay handed out a link to (a bill): a plain GET, no sign."""
        try:
            response = self._http.get(url)
        except httpx.HTTPError as exc:
            raise ProviderUnavailableError(f"Alipay download unreachable: {exc}") from exc
        if response.status_code >= 500:
            raise ProviderUnavailableError(f"Alipay download answered HTTP {response.status_code}")
        if response.status_code != 200:
            # The link lives 30 s: an expired one is refused, and a new one must be asked for.
            raise ProviderRejectedError(
                code=f"http-{response.status_code}",
                message=response.text[:200],
                status=response.status_code,
            )
        return response.content

    @staticmethod
    def _parse(method: str, response: httpx.Response) -> SignedResponse:
        try:
            return extract_signed_response(response.content.decode("utf-8"), method)
        except ValueError as exc:
            # Not the gateway's protocol at all (e.g. a proxy's page): a transient fault.
            raise ProviderUnavailableError(f"{method}: unreadable response: {exc}") from exc

    @staticmethod
    def _model(model: type[_ModelT], body: Mapping[str, Any]) -> _ModelT:
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise ProviderRejectedError(
                code="malformed-response", message=f"{model.__name__}: {exc}"
            ) from exc

    def precreate(
        self,
        out_trade_no: str,
        amount_fen: Fen,
        subject: str,
        timeout_minutes: int,
        notify_url: str | None,
    ) -> PrecreateResponse:
        """Create a dynamic QR trade (当面付 precreate); it exists only once scanned."""
        if not MIN_TIMEOUT_MINUTES <= timeout_minutes <= MAX_TIMEOUT_MINUTES:
            raise ValueError(f"timeout of {timeout_minutes} minutes is outside 1m..15d")
        biz = {
            "out_trade_no": out_trade_no,
            "total_amount": yuan_str(amount_fen),
            "subject": subject,
            "timeout_express": f"{timeout_minutes}m",
        }
        body = self.execute(Method.PRECREATE, biz, notify_url)
        return self._model(PrecreateResponse, body)

    def query_order(self, out_trade_no: str) -> TradeQueryResponse:
        """Query a trade; an unscanned precreate raises ACQ.TRADE_NOT_EXIST."""
        body = self.execute(Method.QUERY, {"out_trade_no": out_trade_no})
        return self._model(TradeQueryResponse, body)

    def close_order(self, out_trade_no: str) -> TradeCloseResponse:
        """Close an unpaid trade; an unscanned precreate raises ACQ.TRADE_NOT_EXIST."""
        body = self.execute(Method.CLOSE, {"out_trade_no": out_trade_no})
        return self._model(TradeCloseResponse, body)

    def refund(
        self, out_trade_no: str, out_request_no: str, amount_fen: Fen, reason: str | None = None
    ) -> RefundResponse:
        """Refund part or all of a paid trade; repeat with the same out_request_no to retry."""
        biz: dict[str, str] = {
            "out_trade_no": out_trade_no,
            "out_request_no": out_request_no,
            "refund_amount": yuan_str(amount_fen),
        }
        if reason:
            biz["refund_reason"] = reason
        body = self.execute(Method.REFUND, biz)
        return self._model(RefundResponse, body)

    def query_refund(self, out_trade_no: str, out_request_no: str) -> RefundQueryResponse:
        """Ask whether the refund `out_request_no` of a trade went through."""
        biz = {
            "out_trade_no": out_trade_no,
            "out_request_no": out_request_no,
            "query_options": ["gmt_refund_pay"],
        }
        body = self.execute(Method.REFUND_QUERY, biz)
        return self._model(RefundQueryResponse, body)

    def bill_download_url(
        self, bill_date: date, bill_type: str = BILL_TYPE_TRADE
    ) -> BillDownloadUrlResponse:
        """Get the download URL of one day's bill (at the latest, yesterday's)."""
        biz = {"bill_type": bill_type, "bill_date": bill_date.isoformat()}  # yyyy-MM-dd
        body = self.execute(Method.BILL_DOWNLOAD_URL, biz)
        return self._model(BillDownloadUrlResponse, body)

"""The merchant's WeChat Pay API v3 client: every network call goes through here.

Each request is signed with the merchant key; each answer's platform signature is
checked before anything in it is believed. Errors are translated once, here:

- network failure, timeout, 5xx, malformed 2xx body -> `ProviderUnavailableError`
- 4xx `{"code","message"}`                          -> `ProviderRejectedError`
- missing, stale or invalid response signature      -> `ProviderSignatureError`
- a bill whose SHA-1 differs from the signed hash   -> `ProviderSignatureError`

Bill files are the one unsigned answer (§1.8): they are trusted through the SHA-1
that the signed `tradebill` answer announced.
"""

import gzip
import hashlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, ValidationError

from roompay.clock import Clock, IdGenerator, RandomIds
from roompay.payments import crypto
from roompay.payments.errors import (
    ProviderRejectedError,
    ProviderSignatureError,
    ProviderUnavailableError,
)
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay import wire

ModelT = TypeVar("ModelT", bound=BaseModel)

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class WechatPayConfig:
    """What the provider hands a merchant, plus where its gateway is."""

    mchid: str
    appid: str
    merchant_serial_no: str
    merchant_private_key_pem: str = field(repr=False)
    apiv3_key: str = field(repr=False)
    platform_public_key_pem: str
    platform_public_key_id: str
    base_url: str = c.PRODUCTION_BASE_URL


@dataclass(frozen=True, slots=True)
class NativeOrder:
    """The body of `POST /v3/pay/transactions/native`, already in wire units."""

    out_trade_no: str
    description: str
    total_fen: int
    time_expire: str
    notify_url: str
    attach: str | None = None


@dataclass(frozen=True, slots=True)
class RefundOrder:
    """The body of `POST /v3/refund/domestic/refunds`, already in wire units."""

    out_trade_no: str
    out_refund_no: str
    refund_fen: int
    total_fen: int
    reason: str = ""
    notify_url: str | None = None


class WechatPayClient:
    """Signs, sends and verifies WeChat Pay API v3 calls for one merchant.

    Pass `http_client` to reuse a ready `httpx.Client` (it is not closed here), or
    `transport` to build one on it; by default a plain client is built.
    """

    def __init__(
        self,
        config: WechatPayConfig,
        clock: Clock,
        *,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        ids: IdGenerator | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._config = config
        self._clock = clock
        self._ids = ids if ids is not None else RandomIds()
        self._merchant_key = crypto.load_private_key(config.merchant_private_key_pem)
        self._platform_keys = {
            config.platform_public_key_id: crypto.load_public_key(config.platform_public_key_pem)
        }
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=timeout_s)
        self._timeout_s = timeout_s
        self._base_url = httpx.URL(config.base_url.rstrip("/"))

    def close(self) -> None:
        """Close the HTTP client if this client built it."""
        if self._owns_http:
            self._http.close()

    # --- operations -------------------------------------------------------------------

    def create_native_order(self, order: NativeOrder) -> wire.NativeOrderResponse:
        """Create a Native (QR) order and return its `code_url`."""
        body: dict[str, object] = {
            "appid": self._config.appid,
            "mchid": self._config.mchid,
            "description": order.description,
            "out_trade_no": order.out_trade_no,
            "time_expire": order.time_expire,
            "notify_url": order.notify_url,
            "amount": {"total": order.total_fen, "currency": c.CURRENCY_CNY},
        }
        if order.attach is not None:
            body["attach"] = order.attach
        response = self.request("POST", c.PATH_NATIVE, json_body=body)
        return self._parse(response, wire.NativeOrderResponse)

    def query_order(self, out_trade_no: str) -> wire.Transaction:
        """Query a transaction by our `out_trade_no`."""
        path = c.PATH_QUERY_BY_OUT_TRADE_NO.format(out_trade_no=out_trade_no)
        response = self.request("GET", path, query={"mchid": self._config.mchid})
        return self._parse(response, wire.Transaction)

    def close_order(self, out_trade_no: str) -> None:
        """Close an unpaid transaction; the provider answers 204."""
        path = c.PATH_CLOSE.format(out_trade_no=out_trade_no)
        self.request("POST", path, json_body={"mchid": self._config.mchid})

    def create_refund(self, order: RefundOrder) -> wire.Refund:
        """Ask for a refund; the same `out_refund_no` again refunds only once (§1.7)."""
        body: dict[str, object] = {
            "out_trade_no": order.out_trade_no,
            "out_refund_no": order.out_refund_no,
        }
        if order.reason:
            body["reason"] = order.reason
        if order.notify_url:
            body["notify_url"] = order.notify_url
        body["amount"] = {
            "refund": order.refund_fen,
            "total": order.total_fen,
            "currency": c.CURRENCY_CNY,
        }
        response = self.request("POST", c.PATH_REFUND, json_body=body)
        return self._parse(response, wire.Refund)

    def query_refund(self, out_refund_no: str) -> wire.Refund:
        """Query one refund by our `out_refund_no`."""
        path = c.PATH_REFUND_QUERY.format(out_refund_no=out_refund_no)
        return self._parse(self.request("GET", path), wire.Refund)

    def trade_bill(self, bill_date: date) -> wire.TradeBillResponse:
        """Ask for the day's ALL trade bill, gzipped: its download URL and SHA-1."""
        query = {
            "bill_date": bill_date.isoformat(),
            "bill_type": c.BILL_TYPE_ALL,
            "tar_type": c.TAR_TYPE_GZIP,
        }
        response = self.request("GET", c.PATH_TRADE_BILL, query=query)
        return self._parse(response, wire.TradeBillResponse)

    def download_bill(self, bill: wire.TradeBillResponse) -> bytes:
        """Download a bill file and return its uncompressed bytes, checked against its SHA-1.

        The request is signed like any call, over the download URL's path from `/v3/`
        on; the answer is an unsigned stream, trusted only through the signed hash.
        """
        url = httpx.URL(bill.download_url)
        request = self._signed_request("GET", url, b"")
        response = self._send(request, verify_2xx=False)
        content = response.content
        if content[:2] == _GZIP_MAGIC:
            try:
                content = gzip.decompress(content)
            except (OSError, EOFError, zlib.error) as exc:
                raise ProviderUnavailableError(f"the bill is not valid gzip: {exc}") from exc
        digest = hashlib.sha1(content, usedforsecurity=False).hexdigest()
        if digest != bill.hash_value.lower():
            raise ProviderSignatureError(f"the bill's SHA-1 {digest} is not the announced one")
        return content

    # --- the signed call ------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        json_body: object | None = None,
    ) -> httpx.Response:
        """Send one signed API call and return its verified 2xx response."""
        body = b"" if json_body is None else _dump(json_body)
        return self._send(self._build(method, path, query, body), verify_2xx=True)

    def _send(self, request: httpx.Request, *, verify_2xx: bool) -> httpx.Response:
        where = f"{request.method} {request.url.path}"
        try:
            response = self._http.send(request)
        except httpx.HTTPError as exc:
            raise ProviderUnavailableError(f"{where}: {exc!r}") from exc
        if response.status_code >= 500:
            raise ProviderUnavailableError(f"{where}: HTTP {response.status_code}")
        if response.status_code >= 300:
            self._verify(response)
            raise _rejection(response)
        if verify_2xx:
            self._verify(response)
        return response

    def _build(
        self, method: str, path: str, query: Mapping[str, str] | None, body: bytes
    ) -> httpx.Request:
        target = self._base_url.raw_path.decode().rstrip("/") + path
        if query:
            target += "?" + urlencode(query)
        url = self._base_url.copy_with(raw_path=target.encode())
        return self._signed_request(method, url, body)

    def _signed_request(self, method: str, url: httpx.URL, body: bytes) -> httpx.Request:
        headers = {
            "Accept": "application/json",
            "User-Agent": "roompay",
            c.HEADER_SERIAL: self._config.platform_public_key_id,
        }
        if body:
            headers["Content-Type"] = "application/json"
        request = self._http.build_request(
            method, url, content=body, headers=headers, timeout=self._timeout_s
        )
        # Sign what is actually sent: the encoded path and query of the built request.
        try:
            signed_url = wire.canonical_url(*_split_raw_path(request.url.raw_path.decode()))
        except wire.WireError as exc:
            raise ProviderUnavailableError(f"cannot sign {url}: {exc}") from exc
        request.headers["Authorization"] = self._authorization(method, signed_url, body)
        return request

    def _authorization(self, method: str, signed_url: str, body: bytes) -> str:
        timestamp = str(int(self._clock.now().timestamp()))
        nonce = self._ids.token(16)
        message = wire.request_message(method, signed_url, timestamp, nonce, body)
        return wire.Authorization(
            mchid=self._config.mchid,
            nonce_str=nonce,
            signature=crypto.sign_b64(self._merchant_key, message),
            timestamp=timestamp,
            serial_no=self._config.merchant_serial_no,
        ).header_value()

    def _verify(self, response: httpx.Response) -> None:
        headers = wire.lower_keys(response.headers)
        try:
            wire.verify_platform_signature(
                headers, response.content, self._platform_keys, self._clock.now()
            )
        except wire.WireError as exc:
            request_id = headers.get(c.HEADER_REQUEST_ID.lower(), "-")
            raise ProviderSignatureError(f"response {request_id}: {exc}") from exc

    @staticmethod
    def _parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ProviderUnavailableError(f"malformed {model.__name__} response") from exc


_GZIP_MAGIC = b"\x1f\x8b"


def _dump(payload: object) -> bytes:
    # The exact bytes signed are the bytes sent; never re-serialize after signing.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _split_raw_path(raw_path: str) -> tuple[str, str]:
    path, _, query = raw_path.partition("?")
    return path, query


def _rejection(response: httpx.Response) -> ProviderRejectedError:
    try:
        error = wire.ErrorBody.model_validate_json(response.content)
    except ValidationError:
        snippet = response.content[:200].decode(errors="replace")
        return ProviderRejectedError(f"HTTP_{response.status_code}", snippet, response.status_code)
    return ProviderRejectedError(error.code, error.message, response.status_code)

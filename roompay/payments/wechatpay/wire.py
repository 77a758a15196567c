"""The WeChat Pay API v3 wire format both sides share.

The merchant client and the sandbox's provider emulator build and check the same
messages, so the rules live once, here:

- request signature message: ``METHOD\\nCANONICAL_URL\\nTIMESTAMP\\nNONCE\\nBODY\\n``
- response and notify message: ``TIMESTAMP\\nNONCE\\nBODY\\n`` (BODY is empty for 204)
- ``Authorization: WECHATPAY2-SHA256-RSA2048 k="v",...`` whose pairs come in any order
- AEAD_AES_256_GCM resources: key = APIv3 key, nonce and associated data as UTF-8,
  ciphertext = base64(ct || 16-byte tag)
- the trade bill: a CSV read by column name, each data cell prefixed with a
  backtick, closed by a totals header (`总交易单数,…`) and a totals line

Functions here raise `ValueError` (or its subclass `WireError`); each side
translates it into its own error once.
"""

import base64
import binascii
import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from roompay.payments import crypto
from roompay.payments.wechatpay import constants as c


class WireError(ValueError):
    """A message that does not follow the wire format or whose signature fails."""


# --- signed messages ----------------------------------------------------------------


def request_message(
    method: str, canonical_url: str, timestamp: str, nonce: str, body: bytes
) -> bytes:
    """Build the message a merchant signs for one request."""
    head = f"{method.upper()}\n{canonical_url}\n{timestamp}\n{nonce}\n".encode()
    return head + body + b"\n"


def response_message(timestamp: str, nonce: str, body: bytes) -> bytes:
    """Build the message the platform signs for a response or a notify."""
    return f"{timestamp}\n{nonce}\n".encode() + body + b"\n"


def canonical_url(raw_path: str, query: str) -> str:
    """Return the URL a signature covers: the path from `/v3/` on, plus `?query` if any.

    The gateway may sit under any prefix (the sandbox is mounted below
    `/sandbox/wechatpay`); the signature covers the path as the real gateway sees it.
    """
    start = raw_path.find(c.API_PATH_MARKER)
    if start < 0:
        raise WireError(f"not an API v3 path: {raw_path!r}")
    path = raw_path[start:]
    return f"{path}?{query}" if query else path


# --- the Authorization header -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parsed `Authorization` header of a merchant's request."""

    mchid: str
    nonce_str: str
    signature: str
    timestamp: str
    serial_no: str

    def header_value(self) -> str:
        """Render the header value in the order the provider documents."""
        pairs = ",".join(f'{key}="{getattr(self, key)}"' for key in c.AUTH_KEYS)
        return f"{c.AUTH_SCHEME} {pairs}"


_AUTH_PAIR = re.compile(r'\s*([A-Za-z_]+)="([^"]*)"\s*(?:,|$)')


def parse_authorization(value: str) -> Authorization:
    """Parse an `Authorization` header; its `k="v"` pairs may come in any order."""
    scheme, _, params = value.strip().partition(" ")
    if scheme != c.AUTH_SCHEME:
        raise WireError(f"unsupported authorization scheme {scheme!r}")
    pairs: dict[str, str] = {}
    position = 0
    params = params.strip()
    while position < len(params):
        match = _AUTH_PAIR.match(params, position)
        if match is None:
            raise WireError("malformed authorization parameters")
        key, val = match.group(1), match.group(2)
        if key in pairs:
            raise WireError(f"authorization parameter {key!r} repeated")
        pairs[key] = val
        position = match.end()
    missing = [key for key in c.AUTH_KEYS if not pairs.get(key)]
    if missing:
        raise WireError(f"authorization lacks {', '.join(missing)}")
    return Authorization(**{key: pairs[key] for key in c.AUTH_KEYS})


# --- platform-signed responses and notifies ---------------------------------------


def lower_keys(headers: Mapping[str, str]) -> dict[str, str]:
    """Copy headers with lower-case names; HTTP header names are case-insensitive."""
    return {name.lower(): value for name, value in headers.items()}


def platform_signature_headers(
    key: rsa.RSAPrivateKey, serial: str, timestamp: str, nonce: str, body: bytes
) -> dict[str, str]:
    """Sign a response or notify body and return the `Wechatpay-*` headers."""
    return {
        c.HEADER_TIMESTAMP: timestamp,
        c.HEADER_NONCE: nonce,
        c.HEADER_SIGNATURE: crypto.sign_b64(key, response_message(timestamp, nonce, body)),
        c.HEADER_SERIAL: serial,
        c.HEADER_SIGNATURE_TYPE: c.SIGNATURE_TYPE,
    }


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name.lower(), "")
    if not value:
        raise WireError(f"missing header {name}")
    return value


def check_timestamp(timestamp: str, now: datetime, max_skew_s: int = c.MAX_CLOCK_SKEW_S) -> None:
    """Refuse a Unix-seconds timestamp more than `max_skew_s` away from `now`."""
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):
        raise WireError(f"malformed timestamp {timestamp!r}")
    skew = abs(int(timestamp) - int(now.timestamp()))
    if skew > max_skew_s:
        raise WireError(f"timestamp {timestamp} is {skew} s away from now")


def verify_platform_signature(
    headers: Mapping[str, str],
    body: bytes,
    public_keys: Mapping[str, rsa.RSAPublicKey],
    now: datetime,
) -> None:
    """Verify a platform-signed response or notify; raise `WireError` if it fails.

    `headers` must have lower-case names (see `lower_keys`). The key is chosen by
    `Wechatpay-Serial` ("the platform key selected by the serial"); probe signatures
    starting with `WECHATPAY/SIGNTEST/` must never verify.
    """
    signature_type = _required(headers, c.HEADER_SIGNATURE_TYPE)
    if signature_type != c.SIGNATURE_TYPE:
        raise WireError(f"unsupported signature type {signature_type!r}")
    serial = _required(headers, c.HEADER_SERIAL)
    key = public_keys.get(serial)
    if key is None:
        raise WireError(f"unknown platform key serial {serial!r}")
    signature = _required(headers, c.HEADER_SIGNATURE)
    if signature.startswith(c.SIGNTEST_PREFIX):
        raise WireError("signature probe")
    timestamp = _required(headers, c.HEADER_TIMESTAMP)
    check_timestamp(timestamp, now)
    nonce = _required(headers, c.HEADER_NONCE)
    if not crypto.verify_b64(key, response_message(timestamp, nonce, body), signature):
        raise WireError("platform signature does not verify")


# --- AEAD_AES_256_GCM ---------------------------------------------------------------


def _aead(apiv3_key: str) -> AESGCM:
    key = apiv3_key.encode()
    if len(key) != c.APIV3_KEY_LENGTH:
        raise WireError(f"the APIv3 key must be {c.APIV3_KEY_LENGTH} bytes")
    return AESGCM(key)


def encrypt_resource(apiv3_key: str, nonce: str, associated_data: str, plaintext: bytes) -> str:
    """Encrypt a resource as the provider does and return base64(ct || tag)."""
    sealed = _aead(apiv3_key).encrypt(nonce.encode(), plaintext, associated_data.encode())
    return base64.b64encode(sealed).decode()


def decrypt_resource(apiv3_key: str, nonce: str, associated_data: str, ciphertext: str) -> bytes:
    """Decrypt and authenticate a resource; raise `WireError` if it was altered."""
    try:
        sealed = base64.b64decode(ciphertext, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireError("ciphertext is not base64") from exc
    if not nonce:
        raise WireError("empty nonce")
    try:
        return _aead(apiv3_key).decrypt(nonce.encode(), sealed, associated_data.encode())
    except InvalidTag as exc:
        raise WireError("ciphertext does not authenticate") from exc


# --- JSON bodies --------------------------------------------------------------------


class WireModel(BaseModel):
    """A provider JSON object: unknown fields are tolerated, as the provider adds some."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ErrorBody(WireModel):
    """A non-2xx body: `{"code","message","detail"?}`."""

    code: str
    message: str = ""


class NativeOrderResponse(WireModel):
    """`200 {"code_url"}` of a Native order."""

    code_url: str = Field(min_length=1)


class Payer(WireModel):
    """The payer of a transaction."""

    openid: str | None = None


class TransactionAmount(WireModel):
    """A transaction's `amount`, in integer fen."""

    total: int
    payer_total: int | None = None
    currency: str = c.CURRENCY_CNY
    payer_currency: str | None = None


class Transaction(WireModel):
    """A transaction as query responses and decrypted payment notifies carry it (§1.4)."""

    appid: str
    mchid: str
    out_trade_no: str
    transaction_id: str | None = None
    trade_type: str | None = None
    trade_state: c.WireTradeState
    trade_state_desc: str = ""
    bank_type: str | None = None
    attach: str = ""
    success_time: AwareDatetime | None = None
    payer: Payer | None = None
    amount: TransactionAmount


class EncryptedResource(WireModel):
    """The `resource` of a notify."""

    original_type: str
    algorithm: str
    ciphertext: str
    associated_data: str = ""
    nonce: str


class NotifyEnvelope(WireModel):
    """The outer, unencrypted body of a notify (§1.6)."""

    id: str = Field(min_length=1)
    create_time: AwareDatetime
    event_type: str
    resource_type: str
    summary: str = ""
    resource: EncryptedResource


class RefundAmount(WireModel):
    """A refund's `amount`, in integer fen."""

    total: int
    refund: int
    payer_total: int | None = None
    payer_refund: int | None = None
    settlement_refund: int | None = None
    settlement_total: int | None = None
    discount_refund: int | None = None
    currency: str = c.CURRENCY_CNY


class Refund(WireModel):
    """The refund object of `POST /v3/refund/domestic/refunds` and of its query (§1.7)."""

    refund_id: str = Field(min_length=1)
    out_refund_no: str = Field(min_length=1)
    transaction_id: str = ""
    out_trade_no: str = Field(min_length=1)
    channel: str = ""
    user_received_account: str = ""
    success_time: AwareDatetime | None = None
    create_time: AwareDatetime | None = None
    status: c.WireRefundStatus
    funds_account: str | None = None
    amount: RefundAmount


class TradeBillResponse(WireModel):
    """`200 {"hash_type","hash_value","download_url"}` of `GET /v3/bill/tradebill` (§1.8)."""

    hash_type: Literal["SHA1"]
    hash_value: str = Field(pattern=r"^[0-9a-fA-F]{40}$")
    download_url: str = Field(min_length=1)


# --- the trade bill -----------------------------------------------------------------


class TradeBillRow(BaseModel):
    """The cells of one bill line that roompay reads, found by column name (§1.8)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    trade_time: str = Field(alias="交易时间")
    transaction_id: str = Field(alias="微信订单号")
    out_trade_no: str = Field(alias="商户订单号")
    trade_state: str = Field(alias="交易状态")
    settlement_total: str = Field(alias="应结订单金额")
    refund_id: str = Field(alias="微信退款单号")
    out_refund_no: str = Field(alias="商户退款单号")
    refund_amount: str = Field(alias="退款金额")
    fee: str = Field(alias="手续费")


def _bill_cell(raw: str) -> str:
    return raw.strip().removeprefix(c.BILL_CELL_PREFIX)


def parse_trade_bill(text: str) -> list[TradeBillRow]:
    """Read the data lines of a trade bill by column name; raise `WireError` if malformed.

    The first line names the columns (unprefixed); each data cell starts with a
    backtick, which is dropped. Reading stops at the totals header (`总交易单数,…`).
    """
    lines = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header = [cell.strip() for cell in next(lines, [])]
    if not header or header[0] != c.TRADE_BILL_ALL_COLUMNS[0]:
        raise WireError("the bill does not start with its header line")
    if len(set(header)) != len(header):
        raise WireError("the bill header repeats a column")
    rows: list[TradeBillRow] = []
    for number, cells in enumerate(lines, start=2):
        if not any(cell.strip() for cell in cells):
            continue
        if cells[0].strip() == c.TRADE_BILL_TOTALS_COLUMNS[0]:
            return rows
        if len(cells) != len(header):
            raise WireError(f"bill line {number} has {len(cells)} cells, not {len(header)}")
        record = {name: _bill_cell(cell) for name, cell in zip(header, cells, strict=True)}
        try:
            rows.append(TradeBillRow.model_validate(record))
        except ValidationError as exc:
            raise WireError(f"bill line {number}: {exc}") from exc
    raise WireError("the bill lacks its totals")

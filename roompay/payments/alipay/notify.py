"""Verify and decode Alipay's asynchronous trade notify (`trade_status_sync`).

Alipay POSTs the notify as `application/x-www-form-urlencoded`, every value a
string. The rule, quoted: drop `sign` and `sign_type`, URL-decode the values,
sort by key, join `k=v` with `&`, and verify RSA2 with the Alipay public key.
Unlike requests, empty values stay in the string to verify.
"""

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated
from urllib.parse import parse_qsl

from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import Fen, parse_yuan
from roompay.payments.alipay.client import parse_beijing_timestamp
from roompay.payments.alipay.constants import CHARSET_UTF8, SIGN_TYPE_RSA2, TradeStatus
from roompay.payments.crypto import verify_b64
from roompay.payments.errors import NotificationRejectedError

_MAX_FIELDS = 200  # a real notify has about 30; more is not Alipay


def _yuan_to_fen(value: object) -> Fen:
    if not isinstance(value, str):
        raise ValueError("an amount must be a yuan string")
    try:
        return parse_yuan(value)
    except InvalidAmountError as exc:
        raise ValueError(str(exc)) from exc


def _optional_yuan_to_fen(value: object) -> Fen | None:
    return None if value in (None, "") else _yuan_to_fen(value)


def _optional_beijing_time(value: object) -> datetime | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError("a time must be a 'yyyy-MM-dd HH:mm:ss' string")
    return parse_beijing_timestamp(value)


YuanFen = Annotated[Fen, BeforeValidator(_yuan_to_fen)]
OptionalYuanFen = Annotated[Fen | None, BeforeValidator(_optional_yuan_to_fen)]
OptionalBeijingTime = Annotated[datetime | None, BeforeValidator(_optional_beijing_time)]


class AlipayTradeNotify(BaseModel):
    """The fields of a trade notify that roompay acts on, amounts already in fen."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    notify_id: str = Field(min_length=1)
    notify_type: str
    notify_time: OptionalBeijingTime
    app_id: str = Field(min_length=1)
    seller_id: str = Field(min_length=1)
    trade_no: str = Field(min_length=1)
    out_trade_no: str = Field(min_length=1)
    out_biz_no: str | None = None  # the refund's out_request_no on refund notifies
    trade_status: TradeStatus
    total_amount: YuanFen
    receipt_amount: OptionalYuanFen = None
    buyer_pay_amount: OptionalYuanFen = None
    refund_fee: OptionalYuanFen = None  # cumulative refunded amount
    gmt_create: OptionalBeijingTime = None
    gmt_payment: OptionalBeijingTime = None
    gmt_refund: str | None = None  # carries milliseconds in the wild; kept as sent
    gmt_close: OptionalBeijingTime = None


def parse_notify_form(body: bytes) -> dict[str, str]:
    """Decode the raw form body into fields; reject repeated or undecodable fields."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FIELDS,
        )
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise NotificationRejectedError(f"notify body is not a UTF-8 form: {exc}") from exc
    fields: dict[str, str] = {}
    for key, value in pairs:
        if key in fields:
            raise NotificationRejectedError(f"notify repeats the field {key!r}")
        fields[key] = value
    return fields


def notify_sign_content(fields: Mapping[str, str]) -> str:
    """Build a notify's string to verify: all fields but `sign`/`sign_type`, sorted, `k=v&…`."""
    kept = sorted((k, v) for k, v in fields.items() if k not in ("sign", "sign_type"))
    return "&".join(f"{key}={value}" for key, value in kept)


def verify_notify(body: bytes, alipay_public_key: rsa.RSAPublicKey) -> AlipayTradeNotify:
    """Verify a notify's RSA2 sign and decode it; raise NotificationRejectedError."""
    fields = parse_notify_form(body)
    sign = fields.get("sign")
    if not sign:
        raise NotificationRejectedError("notify carries no sign")
    if fields.get("sign_type", SIGN_TYPE_RSA2) != SIGN_TYPE_RSA2:
        raise NotificationRejectedError(f"notify sign_type {fields['sign_type']!r} is not RSA2")
    if fields.get("charset", CHARSET_UTF8).lower() != CHARSET_UTF8:
        # Our requests ask for utf-8, so Alipay notifies in utf-8; anything else is not ours.
        raise NotificationRejectedError(f"notify charset {fields['charset']!r} is not utf-8")
    if not verify_b64(alipay_public_key, notify_sign_content(fields).encode("utf-8"), sign):
        raise NotificationRejectedError("notify sign does not verify")
    try:
        return AlipayTradeNotify.model_validate(fields)
    except ValidationError as exc:
        raise NotificationRejectedError(f"malformed notify: {exc}") from exc

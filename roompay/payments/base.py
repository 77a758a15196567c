"""The provider-neutral payment interface and its result types.

Each provider package (`wechatpay`, `alipay`) implements `PaymentProvider`: it
signs and sends requests, verifies every response, parses inbound notifications
and translates the provider's errors into `payments.errors`, so nothing outside
the package knows a wire format.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol

from roompay.domain.catalog import Wallet
from roompay.domain.money import Fen


class TradeState(StrEnum):
    """A provider trade's state in our words."""

    NOT_PAID = "not_paid"  # created or scanned, waiting for the guest
    SUCCESS = "success"  # paid; refundable
    CLOSED = "closed"  # closed or expired without payment, or fully refunded
    REFUNDED = "refunded"  # wholly or partly refunded after payment
    NOT_FOUND = "not_found"  # the provider does not know it (Alipay before the scan)


@dataclass(frozen=True, slots=True)
class QrOrderRequest:
    """What we ask a provider for when a guest checks out."""

    out_trade_no: str
    description: str
    amount_fen: Fen
    expires_at: datetime
    notify_url: str


@dataclass(frozen=True, slots=True)
class QrOrder:
    """The provider's answer: the content to render as the QR code."""

    out_trade_no: str
    qr_content: str


@dataclass(frozen=True, slots=True)
class PaymentNotification:
    """A verified, decoded payment notification.

    `merchant_ok` is False when the notify is authentic but addressed to another
    merchant or app (mchid/appid, or app_id/seller_id): such money must never start
    an appliance.
    """

    wallet: Wallet
    out_trade_no: str
    provider_trade_no: str
    state: TradeState
    amount_fen: Fen
    paid_at: datetime | None
    notification_id: str
    merchant_ok: bool


@dataclass(frozen=True, slots=True)
class TradeSnapshot:
    """What the provider says about a trade when asked (active query)."""

    out_trade_no: str
    state: TradeState
    amount_fen: Fen | None
    provider_trade_no: str | None
    paid_at: datetime | None


class RefundState(StrEnum):
    """A refund's state at the provider, in our words."""

    PROCESSING = "processing"  # accepted; the money is on its way
    SUCCESS = "success"  # the guest has the money back
    ABNORMAL = "abnormal"  # the provider could not pay it back: a person must look
    NOT_FOUND = "not_found"  # the provider has no refund under this key


@dataclass(frozen=True, slots=True)
class RefundRequest:
    """A refund to ask for; `refund_key` is reused on every retry of the same refund."""

    out_trade_no: str
    refund_key: str
    amount_fen: Fen
    total_fen: Fen
    reason: str
    notify_url: str | None = None  # where the provider reports the refund's end, if it does


@dataclass(frozen=True, slots=True)
class RefundOutcome:
    """The provider's answer about one refund."""

    refund_key: str
    state: RefundState
    amount_fen: Fen
    provider_refund_id: str | None


class BillEntryKind(StrEnum):
    """A line of a provider's daily bill."""

    PAYMENT = "payment"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class BillEntry:
    """One payment or refund as the provider's daily bill states it.

    Amounts are positive fen for both kinds; `fee_fen` is the provider's fee on the
    line (negative on a refund line, when the provider gives the fee back).
    """

    kind: BillEntryKind
    out_trade_no: str
    provider_trade_no: str
    refund_key: str | None
    amount_fen: Fen
    fee_fen: Fen
    at: datetime


@dataclass(frozen=True, slots=True)
class NotifyReply:
    """What to answer the provider after handling a notification."""

    status_code: int
    body: bytes
    media_type: str


class PaymentProvider(Protocol):
    """One wallet's provider, as the services see it."""

    wallet: Wallet

    def create_qr_order(self, request: QrOrderRequest) -> QrOrder:
        """Create a QR-code order at the provider and return the QR content."""
        ...

    def parse_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> PaymentNotification:
        """Verify and decode a payment notification; raise NotificationRejectedError."""
        ...

    def reply_ok(self) -> NotifyReply:
        """The reply that tells the provider the notification was handled."""
        ...

    def reply_fail(self, reason: str) -> NotifyReply:
        """The reply that makes the provider send the notification again later."""
        ...

    def query_trade(self, out_trade_no: str) -> TradeSnapshot:
        """Ask the provider for a trade's state (NOT_FOUND if it never saw it)."""
        ...

    def close_trade(self, out_trade_no: str) -> None:
        """Close an unpaid trade so it can no longer be paid.

        Idempotent: a trade already closed, or one the provider never saw (an Alipay
        precreate QR nobody scanned), is not an error. A trade that is already paid
        raises `TradeAlreadyPaidError`.
        """
        ...

    def refund(self, request: RefundRequest) -> RefundOutcome:
        """Ask for a refund; repeating the same `refund_key` never pays twice."""
        ...

    def query_refund(self, out_trade_no: str, refund_key: str) -> RefundOutcome:
        """Ask the provider where a refund stands."""
        ...

    def parse_refund_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> RefundOutcome:
        """Verify and decode a refund-result notification; raise NotificationRejectedError."""
        ...

    def fetch_bill(self, bill_date: date) -> list[BillEntry]:
        """Download and parse the provider's bill of payments and refunds for one day."""
        ...

    def close(self) -> None:
        """Release network connections."""
        ...

"""`AlipayProvider`: Alipay 当面付 (precreate QR) behind roompay's `PaymentProvider`."""

import logging
from collections.abc import Mapping
from datetime import UTC, datetime

import httpx

from roompay.clock import Clock
from roompay.domain.catalog import Wallet
from roompay.payments.alipay.client import AlipayClient, AlipayConfig
from roompay.payments.alipay.constants import (
    MAX_SUBJECT_LEN,
    MAX_TIMEOUT_MINUTES,
    MIN_TIMEOUT_MINUTES,
    NOTIFY_REPLY_FAIL,
    NOTIFY_REPLY_OK,
    SubCode,
    TradeStatus,
)
from roompay.payments.alipay.notify import AlipayTradeNotify, verify_notify
from roompay.payments.base import (
    NotifyReply,
    PaymentNotification,
    QrOrder,
    QrOrderRequest,
    TradeState,
)
from roompay.payments.crypto import load_public_key
from roompay.payments.errors import ProviderRejectedError

log = logging.getLogger(__name__)


def timeout_minutes(expires_at: datetime, now: datetime) -> int:
    """Turn an expiry into whole `timeout_express` minutes, rounded down, within 1m..15d.

    Rounding down lets Alipay stop taking money before our order expires; a
    payment that still lands late is refunded by the services.
    """
    minutes = int((expires_at - now).total_seconds() // 60)
    return min(max(minutes, MIN_TIMEOUT_MINUTES), MAX_TIMEOUT_MINUTES)


def trade_state(status: TradeStatus, refund_fee_fen: int | None) -> TradeState:
    """Map an Alipay trade status to ours; a refund notify carries `refund_fee`."""
    refunded = bool(refund_fee_fen)
    if status is TradeStatus.WAIT_BUYER_PAY:
        return TradeState.NOT_PAID
    if status is TradeStatus.TRADE_CLOSED:
        return TradeState.REFUNDED if refunded else TradeState.CLOSED
    # A partial refund notifies with TRADE_SUCCESS and the cumulative refund_fee.
    return TradeState.REFUNDED if refunded else TradeState.SUCCESS


class AlipayProvider:
    """Alipay OpenAPI (RSA2) for one merchant app."""

    wallet: Wallet = Wallet.ALIPAY

    def __init__(
        self, config: AlipayConfig, clock: Clock, http: httpx.Client | None = None
    ) -> None:
        self._config = config
        self._clock = clock
        self._alipay_key = load_public_key(config.alipay_public_key_pem)
        self.client = AlipayClient(config, clock, http)

    def close(self) -> None:
        """Release the HTTP client."""
        self.client.close()

    def create_qr_order(self, request: QrOrderRequest) -> QrOrder:
        """Precreate the trade and return its `qr_code` as the QR content."""
        result = self.client.precreate(
            out_trade_no=request.out_trade_no,
            amount_fen=request.amount_fen,
            subject=request.description[:MAX_SUBJECT_LEN],
            timeout_minutes=timeout_minutes(request.expires_at, self._clock.now()),
            notify_url=request.notify_url,
        )
        if result.out_trade_no != request.out_trade_no:
            raise ProviderRejectedError(
                code="mismatched-response",
                message=f"asked for {request.out_trade_no}, got {result.out_trade_no}",
            )
        return QrOrder(out_trade_no=request.out_trade_no, qr_content=result.qr_code)

    def query_order(self, out_trade_no: str) -> TradeState:
        """Tell the trade's state; NOT_FOUND until the guest scans the QR."""
        try:
            result = self.client.query_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == SubCode.TRADE_NOT_EXIST:
                return TradeState.NOT_FOUND
            raise
        return trade_state(result.trade_status, None)

    def close_order(self, out_trade_no: str) -> TradeState:
        """Close an unpaid trade; NOT_FOUND means it was never scanned and cannot be closed."""
        try:
            self.client.close_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == SubCode.TRADE_NOT_EXIST:
                return TradeState.NOT_FOUND
            raise
        return TradeState.CLOSED

    def parse_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> PaymentNotification:
        """Verify and decode a trade notify; raise NotificationRejectedError."""
        # The sign covers the whole form, so neither headers nor arrival time add
        # trust, and Alipay resends for ~25 h, so notify_time cannot bound staleness.
        del headers, now
        notify = verify_notify(body, self._alipay_key)
        return self._to_notification(notify)

    def _to_notification(self, notify: AlipayTradeNotify) -> PaymentNotification:
        paid_at = notify.gmt_payment.astimezone(UTC) if notify.gmt_payment else None
        return PaymentNotification(
            wallet=Wallet.ALIPAY,
            out_trade_no=notify.out_trade_no,
            provider_trade_no=notify.trade_no,
            state=trade_state(notify.trade_status, notify.refund_fee),
            amount_fen=notify.total_amount,
            paid_at=paid_at,
            notification_id=notify.notify_id,
            merchant_ok=(
                notify.app_id == self._config.app_id and notify.seller_id == self._config.seller_id
            ),
        )

    def reply_ok(self) -> NotifyReply:
        """Answer `success`, the only reply that stops Alipay's resends."""
        return NotifyReply(status_code=200, body=NOTIFY_REPLY_OK.encode(), media_type="text/plain")

    def reply_fail(self, reason: str) -> NotifyReply:
        """Answer `fail` so that Alipay sends the notify again later."""
        log.info("asking Alipay to resend a notify: %s", reason)
        return NotifyReply(
            status_code=200, body=NOTIFY_REPLY_FAIL.encode(), media_type="text/plain"
        )

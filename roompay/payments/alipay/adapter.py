"""`AlipayProvider`: Alipay 当面付 (precreate QR) behind roompay's `PaymentProvider`."""

import logging
from collections.abc import Mapping
from datetime import UTC, date, datetime

import httpx

from roompay.clock import Clock
from roompay.domain.catalog import Wallet
from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import Fen, parse_yuan
from roompay.payments.alipay.bill import parse_trade_bill
from roompay.payments.alipay.client import AlipayClient, AlipayConfig, parse_beijing_timestamp
from roompay.payments.alipay.constants import (
    MAX_OUT_REQUEST_NO_LEN,
    MAX_REFUND_REASON_LEN,
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
    BillEntry,
    NotifyReply,
    PaymentNotification,
    QrOrder,
    QrOrderRequest,
    RefundOutcome,
    RefundRequest,
    RefundState,
    TradeSnapshot,
    TradeState,
)
from roompay.payments.crypto import load_public_key
from roompay.payments.errors import (
    NotificationRejectedError,
    ProviderRejectedError,
    TradeAlreadyPaidError,
)

log = logging.getLogger(__name__)


def timeout_minutes(expires_at: datetime, now: datetime) -> int:
    """Turn an expiry into whole `timeout_express` minutes, rounded down, within 1m..15d.

    Rounding down lets Alipay stop taking money before our order expires; a
    payment that still lands late is refunded by the services.
    """
    minutes = int((expires_at - now).total_seconds() // 60)
    return min(max(minutes, MIN_TIMEOUT_MINUTES), MAX_TIMEOUT_MINUTES)


def _malformed(message: str) -> ProviderRejectedError:
    return ProviderRejectedError(code="malformed-response", message=message)


def _fen(text: str, name: str) -> Fen:
    try:
        return parse_yuan(text)
    except InvalidAmountError as exc:
        raise _malformed(f"{name} {text!r} is not a yuan amount") from exc


def _check_same(asked: str, answered: str) -> None:
    if asked != answered:
        raise ProviderRejectedError(
            code="mismatched-response", message=f"asked about {asked}, got {answered}"
        )


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

    def query_trade(self, out_trade_no: str) -> TradeSnapshot:
        """Tell the trade's state; NOT_FOUND (no other data) until the guest scans the QR.

        A fully refunded trade is TRADE_CLOSED at Alipay, so it reads CLOSED here too,
        but keeps its `paid_at`: a CLOSED snapshot with `paid_at` was paid once.
        """
        try:
            result = self.client.query_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == SubCode.TRADE_NOT_EXIST:
                return TradeSnapshot(out_trade_no, TradeState.NOT_FOUND, None, None, None)
            raise
        _check_same(out_trade_no, result.out_trade_no)
        try:
            paid_at = (
                parse_beijing_timestamp(result.send_pay_date).astimezone(UTC)
                if result.send_pay_date
                else None
            )
        except ValueError as exc:
            raise _malformed(f"send_pay_date {result.send_pay_date!r}") from exc
        return TradeSnapshot(
            out_trade_no=out_trade_no,
            state=trade_state(result.trade_status, None),
            amount_fen=_fen(result.total_amount, "total_amount"),
            provider_trade_no=result.trade_no,
            paid_at=paid_at,
        )

    def close_trade(self, out_trade_no: str) -> None:
        """Close an unpaid trade; unscanned or already closed is fine, paid raises.

        Alipay answers ACQ.TRADE_STATUS_ERROR both for a closed and for a paid trade,
        so that answer is followed by a query to tell them apart.
        """
        try:
            self.client.close_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == SubCode.TRADE_NOT_EXIST:
                return  # an unscanned QR: Alipay has nothing that could be paid
            if exc.code != SubCode.TRADE_STATUS_ERROR:
                raise
            snapshot = self.query_trade(out_trade_no)
            if snapshot.state is TradeState.SUCCESS or snapshot.paid_at is not None:
                raise TradeAlreadyPaidError(
                    code=exc.code, message=f"trade {out_trade_no} is already paid"
                ) from exc
            if snapshot.state is TradeState.CLOSED:
                return
            raise

    def refund(self, request: RefundRequest) -> RefundOutcome:
        """Refund synchronously under `out_request_no = refund_key`.

        Success is final at once. `fund_change` "N" is Alipay repeating a refund it
        already made under this key: still SUCCESS, and no money moved twice.
        """
        if not 0 < request.amount_fen <= request.total_fen:
            raise ValueError(
                f"refund of {request.amount_fen} fen on a trade of {request.total_fen} fen"
            )
        if not 0 < len(request.refund_key) <= MAX_OUT_REQUEST_NO_LEN:
            raise ValueError(f"refund key {request.refund_key!r} is not 1..64 characters")
        result = self.client.refund(
            out_trade_no=request.out_trade_no,
            out_request_no=request.refund_key,
            amount_fen=request.amount_fen,
            reason=request.reason[:MAX_REFUND_REASON_LEN] or None,
        )
        _check_same(request.out_trade_no, result.out_trade_no)
        if not result.money_moved:
            log.info("Alipay repeated refund %s of %s", request.refund_key, request.out_trade_no)
        # Alipay gives a refund no id of its own: it is known by our out_request_no.
        return RefundOutcome(
            refund_key=request.refund_key,
            state=RefundState.SUCCESS,
            amount_fen=request.amount_fen,
            provider_refund_id=None,
        )

    def query_refund(self, out_trade_no: str, refund_key: str) -> RefundOutcome:
        """Tell where a refund stands; NOT_FOUND means it may be sent again, same key."""
        try:
            result = self.client.query_refund(out_trade_no, refund_key)
        except ProviderRejectedError as exc:
            if exc.code == SubCode.TRADE_NOT_EXIST:
                return RefundOutcome(refund_key, RefundState.NOT_FOUND, 0, None)
            raise
        if not result.has_refund_data:
            return RefundOutcome(refund_key, RefundState.NOT_FOUND, 0, None)
        if result.out_request_no is not None:
            _check_same(refund_key, result.out_request_no)
        amount = _fen(result.refund_amount or "0", "refund_amount")
        # refund_status has one documented value; any other is not yet a success.
        state = RefundState.SUCCESS if result.refunded else RefundState.PROCESSING
        return RefundOutcome(refund_key, state, amount, None)

    def fetch_bill(self, bill_date: date) -> list[BillEntry]:
        """Download and parse one day's trade bill; a day without a bill is empty."""
        try:
            link = self.client.bill_download_url(bill_date)
        except ProviderRejectedError as exc:
            if exc.code == SubCode.BILL_NOT_EXIST:
                return []
            raise
        return parse_trade_bill(self.client.download(link.bill_download_url))

    def parse_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> PaymentNotification:
        """Verify and decode a trade notify; raise NotificationRejectedError."""
        # The sign covers the whole form, so neither headers nor arrival time add
        # trust, and Alipay resends for ~25 h, so notify_time cannot bound staleness.
        del headers, now
        notify = verify_notify(body, self._alipay_key)
        return self._to_notification(notify)

    def parse_refund_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> RefundOutcome:
        """Verify a trade notify that reports a refund (`out_biz_no` = our refund key).

        Alipay refunds succeed synchronously; the notify only confirms one, so the
        outcome is SUCCESS. `amount_fen` is 0: the notify carries the cumulative
        `refund_fee`, not this refund's amount, and the refund row knows its amount.
        """
        del headers, now
        notify = verify_notify(body, self._alipay_key)
        if notify.out_biz_no is None or notify.refund_fee is None:
            raise NotificationRejectedError("not a refund notify: no out_biz_no or refund_fee")
        if (notify.app_id, notify.seller_id) != (self._config.app_id, self._config.seller_id):
            raise NotificationRejectedError("refund notify for another app or seller")
        return RefundOutcome(notify.out_biz_no, RefundState.SUCCESS, 0, None)

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

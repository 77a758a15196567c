"""WeChat Pay as a `PaymentProvider`: our domain types in, our domain types out."""

import json
from collections.abc import Mapping
from datetime import UTC, datetime

import httpx

from roompay.clock import Clock, IdGenerator
from roompay.domain.catalog import Wallet
from roompay.payments import crypto
from roompay.payments.base import (
    NotifyReply,
    PaymentNotification,
    QrOrder,
    QrOrderRequest,
    TradeState,
)
from roompay.payments.errors import NotificationRejectedError, ProviderRejectedError
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay.client import NativeOrder, WechatPayClient, WechatPayConfig
from roompay.payments.wechatpay.notify import parse_transaction_notify

__all__ = ["WechatPayConfig", "WechatPayProvider", "rfc3339_cst", "trade_state"]

_STATES: dict[c.WireTradeState, TradeState] = {
    c.WireTradeState.SUCCESS: TradeState.SUCCESS,
    c.WireTradeState.NOTPAY: TradeState.NOT_PAID,
    # Only payment-code orders reach USERPAYING; the guest has not paid yet.
    c.WireTradeState.USERPAYING: TradeState.NOT_PAID,
    c.WireTradeState.CLOSED: TradeState.CLOSED,
    c.WireTradeState.REVOKED: TradeState.CLOSED,
    c.WireTradeState.PAYERROR: TradeState.CLOSED,
    c.WireTradeState.REFUND: TradeState.REFUNDED,
}


def trade_state(state: c.WireTradeState) -> TradeState:
    """Translate the provider's `trade_state` into ours."""
    return _STATES[state]


def rfc3339_cst(moment: datetime) -> str:
    """Format an aware datetime as the provider wants: RFC 3339 in +08:00, whole seconds."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no place on the wire")
    return moment.astimezone(c.CHINA_TZ).isoformat(timespec="seconds")


class WechatPayProvider:
    """WeChat Pay API v3 Native payments for one merchant."""

    wallet: Wallet = Wallet.WECHAT

    def __init__(
        self,
        config: WechatPayConfig,
        clock: Clock,
        *,
        http_client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        ids: IdGenerator | None = None,
    ) -> None:
        self._config = config
        self.client = WechatPayClient(
            config, clock, http_client=http_client, transport=transport, ids=ids
        )
        self._platform_keys = {
            config.platform_public_key_id: crypto.load_public_key(config.platform_public_key_pem)
        }

    def create_qr_order(self, request: QrOrderRequest) -> QrOrder:
        """Create a Native order and return its `code_url` as the QR content."""
        answer = self.client.create_native_order(
            NativeOrder(
                out_trade_no=request.out_trade_no,
                description=request.description[: c.DESCRIPTION_MAX_CHARS],
                total_fen=request.amount_fen,
                time_expire=rfc3339_cst(request.expires_at),
                notify_url=request.notify_url,
            )
        )
        return QrOrder(out_trade_no=request.out_trade_no, qr_content=answer.code_url)

    def query_state(self, out_trade_no: str) -> TradeState:
        """Ask the provider for a trade's state; an unknown trade is NOT_FOUND."""
        try:
            transaction = self.client.query_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == c.ErrorCode.ORDER_NOT_EXIST:
                return TradeState.NOT_FOUND
            raise
        return trade_state(transaction.trade_state)

    def close_order(self, out_trade_no: str) -> None:
        """Close an unpaid trade; closing one that is already closed is not an error."""
        try:
            self.client.close_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code != c.ErrorCode.ORDER_CLOSED:
                raise

    def parse_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> PaymentNotification:
        """Verify and decode a payment notify; raise NotificationRejectedError."""
        notify = parse_transaction_notify(
            headers, body, now, self._platform_keys, self._config.apiv3_key
        )
        transaction = notify.transaction
        if transaction.trade_state == c.WireTradeState.SUCCESS and not (
            transaction.transaction_id and transaction.success_time
        ):
            raise NotificationRejectedError("a paid transaction lacks its id or success_time")
        return PaymentNotification(
            wallet=self.wallet,
            out_trade_no=transaction.out_trade_no,
            provider_trade_no=transaction.transaction_id or "",
            state=trade_state(transaction.trade_state),
            amount_fen=transaction.amount.total,
            paid_at=transaction.success_time.astimezone(UTC) if transaction.success_time else None,
            notification_id=notify.envelope.id,
            merchant_ok=(
                transaction.mchid == self._config.mchid and transaction.appid == self._config.appid
            ),
        )

    def reply_ok(self) -> NotifyReply:
        """Answer 204: the provider treats 200 and 204 as handled."""
        return NotifyReply(status_code=204, body=b"", media_type="application/json")

    def reply_fail(self, reason: str) -> NotifyReply:
        """Answer 500 `{"code":"FAIL","message":reason}` so that the provider retries."""
        body = json.dumps({"code": "FAIL", "message": reason}, ensure_ascii=False).encode()
        return NotifyReply(status_code=500, body=body, media_type="application/json")

    def close(self) -> None:
        """Release the HTTP client."""
        self.client.close()

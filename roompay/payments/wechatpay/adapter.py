"""WeChat Pay as a `PaymentProvider`: our domain types in, our domain types out."""

import json
from collections.abc import Mapping
from datetime import UTC, date, datetime

import httpx
from pydantic import BaseModel, ValidationError

from roompay.clock import Clock, IdGenerator
from roompay.domain.catalog import Wallet
from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import parse_yuan
from roompay.payments import crypto
from roompay.payments.base import (
    BillEntry,
    BillEntryKind,
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
from roompay.payments.errors import (
    NotificationRejectedError,
    ProviderRejectedError,
    ProviderUnavailableError,
    TradeAlreadyPaidError,
)
from roompay.payments.wechatpay import constants as c
from roompay.payments.wechatpay import wire
from roompay.payments.wechatpay.client import (
    DEFAULT_TIMEOUT_S,
    NativeOrder,
    RefundOrder,
    WechatPayClient,
    WechatPayConfig,
)
from roompay.payments.wechatpay.notify import open_notify, parse_transaction_notify

__all__ = [
    "WechatPayConfig",
    "WechatPayProvider",
    "bill_entries",
    "refund_state",
    "rfc3339_cst",
    "trade_state",
]

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


_REFUND_STATES: dict[c.WireRefundStatus, RefundState] = {
    c.WireRefundStatus.SUCCESS: RefundState.SUCCESS,
    c.WireRefundStatus.PROCESSING: RefundState.PROCESSING,
    # ABNORMAL: the money could not reach the guest (a closed card, a frozen account);
    # CLOSED: the provider gave up. Either way a person has to pay the guest back.
    c.WireRefundStatus.ABNORMAL: RefundState.ABNORMAL,
    c.WireRefundStatus.CLOSED: RefundState.ABNORMAL,
}


def trade_state(state: c.WireTradeState) -> TradeState:
    """Translate the provider's `trade_state` into ours."""
    return _STATES[state]


def refund_state(status: c.WireRefundStatus) -> RefundState:
    """Translate the provider's refund `status` into ours."""
    return _REFUND_STATES[status]


def bill_entries(rows: list[wire.TradeBillRow]) -> list[BillEntry]:
    """Turn trade-bill lines into bill entries; raise `ValueError` on a malformed cell.

    Payment lines (交易状态 SUCCESS) count 应结订单金额; refund lines (REFUND) count
    退款金额 under 商户退款单号. Lines in other states (REVOKED, for payment-code
    orders only) carry no money for a Native merchant and are skipped.
    """
    entries: list[BillEntry] = []
    for row in rows:
        if row.trade_state == c.BILL_STATE_SUCCESS:
            kind, refund_key, amount = BillEntryKind.PAYMENT, None, row.settlement_total
        elif row.trade_state == c.BILL_STATE_REFUND:
            kind, refund_key, amount = BillEntryKind.REFUND, row.out_refund_no, row.refund_amount
        else:
            continue
        at = datetime.strptime(row.trade_time, c.BILL_TIME_FORMAT).replace(tzinfo=c.CHINA_TZ)
        entries.append(
            BillEntry(
                kind=kind,
                out_trade_no=row.out_trade_no,
                provider_trade_no=row.transaction_id,
                refund_key=refund_key,
                amount_fen=parse_yuan(amount),
                fee_fen=parse_yuan(row.fee),
                at=at.astimezone(UTC),
            )
        )
    return entries


def rfc3339_cst(moment: datetime) -> str:
    """Format an aware datetime as the provider wants: RFC 3339 in +08:00, whole seconds."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no place on the wire")
    return moment.astimezone(c.CHINA_TZ).isoformat(timespec="seconds")


class RefundNoticeAmount(BaseModel):
    """The amounts of a refund notify; only the refunded amount matters here."""

    refund: int


class RefundNotice(BaseModel):
    """The decrypted resource of a `REFUND.*` notify."""

    mchid: str
    out_trade_no: str
    out_refund_no: str
    refund_id: str
    refund_status: c.WireRefundStatus
    amount: RefundNoticeAmount


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
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._config = config
        self.client = WechatPayClient(
            config,
            clock,
            http_client=http_client,
            transport=transport,
            ids=ids,
            timeout_s=timeout_s,
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

    def query_trade(self, out_trade_no: str) -> TradeSnapshot:
        """Ask the provider for a trade; one it never saw (404 ORDER_NOT_EXIST) is NOT_FOUND."""
        try:
            transaction = self.client.query_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == c.ErrorCode.ORDER_NOT_EXIST:
                return TradeSnapshot(out_trade_no, TradeState.NOT_FOUND, None, None, None)
            raise
        success_time = transaction.success_time
        return TradeSnapshot(
            out_trade_no=out_trade_no,
            state=trade_state(transaction.trade_state),
            amount_fen=transaction.amount.total,
            provider_trade_no=transaction.transaction_id or None,
            paid_at=success_time.astimezone(UTC) if success_time else None,
        )

    def close_trade(self, out_trade_no: str) -> None:
        """Close an unpaid trade so that it can no longer be paid.

        Idempotent: ORDER_CLOSED (closed before) and ORDER_NOT_EXIST (never created)
        are not errors. ORDERPAID raises `TradeAlreadyPaidError`: the guest's money
        is in, and the caller must decide (start the appliance or refund).
        """
        try:
            self.client.close_order(out_trade_no)
        except ProviderRejectedError as exc:
            if exc.code == c.ErrorCode.ORDERPAID:
                raise TradeAlreadyPaidError(exc.code, exc.message, exc.status) from exc
            if exc.code not in (c.ErrorCode.ORDER_CLOSED, c.ErrorCode.ORDER_NOT_EXIST):
                raise

    def refund(self, request: RefundRequest) -> RefundOutcome:
        """Ask for a refund under `out_refund_no = refund_key`.

        "Reusing an out_refund_no refunds only once" (§1.7): after a timeout or
        SYSTEM_ERROR (`ProviderUnavailableError`), retry with the same `refund_key`.
        The answer only says the refund was accepted unless its state is SUCCESS.
        """
        refund = self.client.create_refund(
            RefundOrder(
                out_trade_no=request.out_trade_no,
                out_refund_no=request.refund_key,
                refund_fen=request.amount_fen,
                total_fen=request.total_fen,
                reason=request.reason[: c.REFUND_REASON_MAX_CHARS],
                notify_url=request.notify_url,
            )
        )
        return self._outcome(refund, request.out_trade_no, request.refund_key)

    def query_refund(self, out_trade_no: str, refund_key: str) -> RefundOutcome:
        """Ask where a refund stands; one the provider never saw (404) is NOT_FOUND."""
        try:
            refund = self.client.query_refund(refund_key)
        except ProviderRejectedError as exc:
            if exc.code == c.ErrorCode.RESOURCE_NOT_EXISTS:
                return RefundOutcome(refund_key, RefundState.NOT_FOUND, 0, None)
            raise
        return self._outcome(refund, out_trade_no, refund_key)

    @staticmethod
    def _outcome(refund: wire.Refund, out_trade_no: str, refund_key: str) -> RefundOutcome:
        if (refund.out_trade_no, refund.out_refund_no) != (out_trade_no, refund_key):
            # Never count money against the wrong trade: a refund key reused across
            # trades is a bug on our side, and must stop here loudly.
            raise ProviderRejectedError(
                "REFUND_KEY_MISMATCH",
                f"refund {refund.out_refund_no} belongs to trade {refund.out_trade_no}, "
                f"not to {out_trade_no} under {refund_key}",
            )
        return RefundOutcome(
            refund_key=refund_key,
            state=refund_state(refund.status),
            amount_fen=refund.amount.refund,
            provider_refund_id=refund.refund_id,
        )

    def parse_refund_notification(
        self, headers: Mapping[str, str], body: bytes, now: datetime
    ) -> RefundOutcome:
        """Verify and decrypt a `REFUND.*` notify (§1.7) into the refund's outcome."""
        opened = open_notify(headers, body, now, self._platform_keys, self._config.apiv3_key)
        if opened.envelope.resource.original_type != c.ORIGINAL_TYPE_REFUND:
            raise NotificationRejectedError("not a refund notify")
        try:
            result = RefundNotice.model_validate_json(opened.plaintext)
        except ValidationError as exc:
            raise NotificationRejectedError(f"malformed refund notify: {exc}") from exc
        if result.mchid != self._config.mchid:
            raise NotificationRejectedError("refund notify for another merchant")
        return RefundOutcome(
            refund_key=result.out_refund_no,
            state=refund_state(result.refund_status),
            amount_fen=result.amount.refund,
            provider_refund_id=result.refund_id,
        )

    def fetch_bill(self, bill_date: date) -> list[BillEntry]:
        """Download the day's ALL trade bill and return its payments and refunds.

        A day without a bill (400 NO_STATEMENT_EXIST: no trade that day) is empty.
        """
        try:
            bill = self.client.trade_bill(bill_date)
        except ProviderRejectedError as exc:
            if exc.code == c.ErrorCode.NO_STATEMENT_EXIST:
                return []
            raise
        content = self.client.download_bill(bill)
        try:
            return bill_entries(wire.parse_trade_bill(content.decode("utf-8")))
        except (ValueError, InvalidAmountError) as exc:
            raise ProviderUnavailableError(f"malformed trade bill of {bill_date}: {exc}") from exc

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

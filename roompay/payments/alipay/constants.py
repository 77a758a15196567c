"""Alipay OpenAPI names and codes, as the gateway spells them."""

from datetime import timedelta, timezone
from enum import StrEnum

# Alipay speaks Beijing time everywhere: request timestamps, notify times, gmt_* fields.
BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

FORMAT_JSON = "JSON"
CHARSET_UTF8 = "utf-8"
SIGN_TYPE_RSA2 = "RSA2"
API_VERSION = "1.0"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded;charset=utf-8"
NOTIFY_REPLY_OK = "success"
NOTIFY_REPLY_FAIL = "fail"
NOTIFY_TYPE_TRADE_STATUS_SYNC = "trade_status_sync"
ERROR_RESPONSE_KEY = "error_response"

MAX_OUT_TRADE_NO_LEN = 64
MAX_SUBJECT_LEN = 256
MIN_TIMEOUT_MINUTES = 1
MAX_TIMEOUT_MINUTES = 15 * 24 * 60  # timeout_express allows at most 15d


class Method(StrEnum):
    """The gateway methods roompay calls."""

    PRECREATE = "alipay.trade.precreate"
    QUERY = "alipay.trade.query"
    CLOSE = "alipay.trade.close"
    REFUND = "alipay.trade.refund"
    REFUND_QUERY = "alipay.trade.fastpay.refund.query"
    BILL_DOWNLOAD_URL = "alipay.data.dataservice.bill.downloadurl.query"


def response_key(method: str) -> str:
    """Name a method's response object: "alipay.trade.query" -> "alipay_trade_query_response"."""
    return method.replace(".", "_") + "_response"


class Code(StrEnum):
    """The gateway's top-level result codes."""

    SUCCESS = "10000"
    UNKNOWN_ERROR = "20000"  # isp.unknow-error: the provider failed; retry
    INVALID_AUTH_TOKEN = "20001"  # noqa: S105 - a result code, not a secret
    MISSING_PARAMETER = "40001"
    INVALID_PARAMETER = "40002"
    BUSINESS_FAILED = "40004"
    INSUFFICIENT_PERMISSIONS = "40006"


CODE_MESSAGES: dict[Code, str] = {
    Code.SUCCESS: "Success",
    Code.UNKNOWN_ERROR: "Service Currently Unavailable",
    Code.INVALID_AUTH_TOKEN: "Insufficient Token Permissions",
    Code.MISSING_PARAMETER: "Missing Required Arguments",
    Code.INVALID_PARAMETER: "Invalid Arguments",
    Code.BUSINESS_FAILED: "Business Failed",
    Code.INSUFFICIENT_PERMISSIONS: "Insufficient Permissions",
}


class SubCode(StrEnum):
    """The sub_codes roompay and the sandbox name."""

    UNKNOWN_ERROR = "isp.unknow-error"  # sic: the gateway's spelling
    MISSING_APP_ID = "isv.missing-app-id"
    MISSING_METHOD = "isv.missing-method"
    MISSING_SIGNATURE = "isv.missing-signature"
    MISSING_SIGNATURE_TYPE = "isv.missing-signature-type"
    MISSING_TIMESTAMP = "isv.missing-timestamp"
    MISSING_VERSION = "isv.missing-version"
    INVALID_SIGNATURE = "isv.invalid-signature"
    INVALID_SIGNATURE_TYPE = "isv.invalid-signature-type"
    INVALID_APP_ID = "isv.invalid-app-id"
    INVALID_TIMESTAMP = "isv.invalid-timestamp"
    INVALID_CHARSET = "isv.invalid-charset"
    INVALID_FORMAT = "isv.invalid-format"
    INVALID_METHOD = "isv.invalid-method"
    SYSTEM_ERROR = "ACQ.SYSTEM_ERROR"
    INVALID_BIZ_PARAMETER = "ACQ.INVALID_PARAMETER"
    CONTEXT_INCONSISTENT = "ACQ.CONTEXT_INCONSISTENT"
    TRADE_NOT_EXIST = "ACQ.TRADE_NOT_EXIST"
    TRADE_STATUS_ERROR = "ACQ.TRADE_STATUS_ERROR"
    TRADE_HAS_SUCCESS = "ACQ.TRADE_HAS_SUCCESS"
    TRADE_HAS_CLOSE = "ACQ.TRADE_HAS_CLOSE"


class TradeStatus(StrEnum):
    """An Alipay trade's status, in sync responses and notifies."""

    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"  # scanned, not paid
    TRADE_CLOSED = "TRADE_CLOSED"  # timed out unpaid, closed, or fully refunded
    TRADE_SUCCESS = "TRADE_SUCCESS"  # paid, still refundable
    TRADE_FINISHED = "TRADE_FINISHED"  # paid, no longer refundable

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
    TRADE_HAS_FINISHED = "ACQ.TRADE_HAS_FINISHED"
    REFUND_AMT_NOT_EQUAL_TOTAL = "ACQ.REFUND_AMT_NOT_EQUAL_TOTAL"  # more than was paid
    DISCORDANT_REPEAT_REQUEST = "ACQ.DISCORDANT_REPEAT_REQUEST"  # same key, other amount
    SELLER_BALANCE_NOT_ENOUGH = "ACQ.SELLER_BALANCE_NOT_ENOUGH"
    BILL_NOT_EXIST = "isp.bill_not_exist"


class TradeStatus(StrEnum):
    """An Alipay trade's status, in sync responses and notifies."""

    WAIT_BUYER_PAY = "WAIT_BUYER_PAY"  # scanned, not paid
    TRADE_CLOSED = "TRADE_CLOSED"  # timed out unpaid, closed, or fully refunded
    TRADE_SUCCESS = "TRADE_SUCCESS"  # paid, still refundable
    TRADE_FINISHED = "TRADE_FINISHED"  # paid, no longer refundable


REFUND_STATUS_SUCCESS = "REFUND_SUCCESS"  # the only refund_status; absent means "not refunded"
FUND_CHANGE_YES = "Y"  # this very refund call moved money
FUND_CHANGE_NO = "N"  # an idempotent repeat of a refund already made
MAX_OUT_REQUEST_NO_LEN = 64
MAX_REFUND_REASON_LEN = 256

# The trade bill (`bill_type=trade`): a zip of GBK-encoded CSVs, one of them the detail.
BILL_TYPE_TRADE = "trade"
BILL_ENCODING = "gbk"
BILL_DETAIL_SUFFIX = "业务明细.csv"
BILL_SUMMARY_SUFFIX = "业务明细(汇总).csv"
BILL_COMMENT_PREFIX = "#"


class BillColumn(StrEnum):
    """The detail file's columns that roompay reads, named as the header row spells them."""

    TRADE_NO = "支付宝交易号"
    OUT_TRADE_NO = "商户订单号"
    BUSINESS_TYPE = "业务类型"
    FINISHED_AT = "完成时间"
    ORDER_AMOUNT = "订单金额（元）"
    REFUND_REQUEST_NO = "退款批次号/请求号"
    SERVICE_FEE = "服务费（元）"


class BillBusinessType(StrEnum):
    """The detail file's 业务类型 values for 当面付."""

    PAYMENT = "交易"
    REFUND = "退款"

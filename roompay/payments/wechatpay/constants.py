"""WeChat Pay API v3 names: paths, headers, schemes and wire values.

Everything here is quoted from the provider's documentation; see
`research/payments.md` §1.
"""

from datetime import timedelta, timezone
from enum import StrEnum
from typing import Final

PRODUCTION_BASE_URL: Final = "https://api.mch.weixin.qq.com"

# Paths below the base URL. The signature's canonical URL is the path from `/v3/` on.
PATH_NATIVE: Final = "/v3/pay/transactions/native"
PATH_QUERY_BY_OUT_TRADE_NO: Final = "/v3/pay/transactions/out-trade-no/{out_trade_no}"
PATH_CLOSE: Final = "/v3/pay/transactions/out-trade-no/{out_trade_no}/close"
PATH_REFUND: Final = "/v3/refund/domestic/refunds"
PATH_REFUND_QUERY: Final = "/v3/refund/domestic/refunds/{out_refund_no}"
PATH_TRADE_BILL: Final = "/v3/bill/tradebill"
PATH_BILL_DOWNLOAD: Final = "/v3/billdownload/file"
API_PATH_MARKER: Final = "/v3/"

# The scheme of the Authorization header and of `Wechatpay-Signature-Type`.
AUTH_SCHEME: Final = "WECHATPAY2-SHA256-RSA2048"
SIGNATURE_TYPE: Final = AUTH_SCHEME

# Response and notify headers (compared case-insensitively, stored lower-case).
HEADER_TIMESTAMP: Final = "Wechatpay-Timestamp"
HEADER_NONCE: Final = "Wechatpay-Nonce"
HEADER_SIGNATURE: Final = "Wechatpay-Signature"
HEADER_SERIAL: Final = "Wechatpay-Serial"
HEADER_SIGNATURE_TYPE: Final = "Wechatpay-Signature-Type"
HEADER_REQUEST_ID: Final = "Request-ID"

# The keys of the Authorization header's `k="v"` pairs.
AUTH_KEYS: Final = ("mchid", "nonce_str", "signature", "timestamp", "serial_no")

# "签名探测流量": probe notifies whose signature must never verify.
SIGNTEST_PREFIX: Final = "WECHATPAY/SIGNTEST/"
# Responses and notifies older or newer than five minutes are refused.
MAX_CLOCK_SKEW_S: Final = 300

# AEAD_AES_256_GCM resources (notifies, certificates).
AEAD_ALGORITHM: Final = "AEAD_AES_256_GCM"
AEAD_NONCE_LENGTH: Final = 12
APIV3_KEY_LENGTH: Final = 32
RESOURCE_TYPE_ENCRYPTED: Final = "encrypt-resource"
ORIGINAL_TYPE_TRANSACTION: Final = "transaction"
ORIGINAL_TYPE_REFUND: Final = "refund"
EVENT_TRANSACTION_SUCCESS: Final = "TRANSACTION.SUCCESS"
EVENT_REFUND_PREFIX: Final = "REFUND."  # REFUND.SUCCESS, REFUND.ABNORMAL, REFUND.CLOSED

# Native order rules.
DESCRIPTION_MAX_CHARS: Final = 127
ATTACH_MAX_CHARS: Final = 128
CURRENCY_CNY: Final = "CNY"
TRADE_TYPE_NATIVE: Final = "NATIVE"
CODE_URL_PREFIX: Final = "weixin://wxpay/bizpayurl?pr="

# Refund rules (§1.7).
REFUND_REASON_MAX_CHARS: Final = 80

# Trade bill (§1.8): the request's fixed values and the CSV's column names.
BILL_TYPE_ALL: Final = "ALL"
TAR_TYPE_GZIP: Final = "GZIP"
HASH_TYPE_SHA1: Final = "SHA1"
BILL_CELL_PREFIX: Final = "`"
BILL_STATE_SUCCESS: Final = "SUCCESS"
BILL_STATE_REFUND: Final = "REFUND"
# The 27 columns of the ALL bill, in order. Some merchants get more, so read by name.
TRADE_BILL_ALL_COLUMNS: Final = (
    "交易时间",
    "公众账号ID",
    "商户号",
    "特约商户号",
    "设备号",
    "微信订单号",
    "商户订单号",
    "用户标识",
    "交易类型",
    "交易状态",
    "付款银行",
    "货币种类",
    "应结订单金额",
    "代金券金额",
    "微信退款单号",
    "商户退款单号",
    "退款金额",
    "充值券退款金额",
    "退款类型",
    "退款状态",
    "商品名称",
    "商户数据包",
    "手续费",
    "费率",
    "订单金额",
    "申请退款金额",
    "费率备注",
)
# The header of the totals that close the bill, followed by one line of totals.
TRADE_BILL_TOTALS_COLUMNS: Final = (
    "总交易单数",
    "应结订单总金额",
    "退款总金额",
    "充值券退款总金额",
    "手续费总金额",
    "订单总金额",
    "申请退款总金额",
)
# 交易时间 is Beijing time without an offset.
BILL_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"

# Times on the wire are RFC 3339 in China Standard Time, e.g. 2025-05-20T13:29:35+08:00.
CHINA_TZ: Final = timezone(timedelta(hours=8), "CST")


class WireTradeState(StrEnum):
    """`trade_state` as the provider spells it."""

    SUCCESS = "SUCCESS"
    REFUND = "REFUND"
    NOTPAY = "NOTPAY"
    CLOSED = "CLOSED"
    REVOKED = "REVOKED"
    USERPAYING = "USERPAYING"
    PAYERROR = "PAYERROR"


class WireRefundStatus(StrEnum):
    """A refund's `status` as the provider spells it."""

    SUCCESS = "SUCCESS"
    CLOSED = "CLOSED"
    PROCESSING = "PROCESSING"
    ABNORMAL = "ABNORMAL"


class ErrorCode(StrEnum):
    """Error codes in `{"code","message"}` bodies that roompay names."""

    PARAM_ERROR = "PARAM_ERROR"
    SIGN_ERROR = "SIGN_ERROR"
    OUT_TRADE_NO_USED = "OUT_TRADE_NO_USED"
    ORDER_NOT_EXIST = "ORDER_NOT_EXIST"
    ORDERPAID = "ORDERPAID"
    ORDER_CLOSED = "ORDER_CLOSED"
    SYSTEM_ERROR = "SYSTEM_ERROR"
    INVALID_REQUEST = "INVALID_REQUEST"
    NOT_ENOUGH = "NOT_ENOUGH"
    RESOURCE_NOT_EXISTS = "RESOURCE_NOT_EXISTS"
    NO_STATEMENT_EXIST = "NO_STATEMENT_EXIST"

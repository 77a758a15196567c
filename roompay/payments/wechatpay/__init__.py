"""WeChat Pay API v3 (Native): client, notify verification and the `PaymentProvider`."""

from roompay.payments.wechatpay.adapter import WechatPayProvider
from roompay.payments.wechatpay.client import WechatPayClient, WechatPayConfig

__all__ = ["WechatPayClient", "WechatPayConfig", "WechatPayProvider"]

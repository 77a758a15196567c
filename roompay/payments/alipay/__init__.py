"""Alipay OpenAPI (RSA2), 当面付 precreate: constants, client, notify, adapter."""

from roompay.payments.alipay.adapter import AlipayProvider
from roompay.payments.alipay.client import AlipayClient, AlipayConfig

__all__ = ["AlipayClient", "AlipayConfig", "AlipayProvider"]

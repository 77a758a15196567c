"""Builds the configured providers from settings: one place that reads key files."""

from pathlib import Path

from roompay.clock import Clock, SystemClock
from roompay.domain.catalog import Wallet
from roompay.payments.alipay import AlipayConfig, AlipayProvider
from roompay.payments.base import PaymentProvider
from roompay.payments.wechatpay import WechatPayConfig, WechatPayProvider
from roompay.settings import Settings, SettingsError


def _read(path: Path | None, what: str) -> str:
    if path is None:
        raise SettingsError(f"{what} is not set")
    try:
        return path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read {what} at {path}: {exc.strerror}") from exc


def _wechat_configured(s: Settings) -> bool:
    return s.wechat_mchid is not None


def _alipay_configured(s: Settings) -> bool:
    return s.alipay_app_id is not None


def _required(s: Settings, name: str) -> str:
    value = getattr(s, name)
    if not value:
        raise SettingsError(f"ROOMPAY_{name.upper()} is not set")
    return str(value)


def wechat_config(s: Settings) -> WechatPayConfig:
    """The WeChat Pay merchant configuration; raise SettingsError if incomplete."""
    apiv3_key = _required(s, "wechat_apiv3_key")
    if len(apiv3_key.encode()) != 32:
        raise SettingsError("ROOMPAY_WECHAT_APIV3_KEY must be 32 bytes")
    return WechatPayConfig(
        mchid=_required(s, "wechat_mchid"),
        appid=_required(s, "wechat_appid"),
        merchant_serial_no=_required(s, "wechat_serial_no"),
        merchant_private_key_pem=_read(
            s.wechat_private_key_path, "ROOMPAY_WECHAT_PRIVATE_KEY_PATH"
        ),
        apiv3_key=apiv3_key,
        platform_public_key_pem=_read(
            s.wechat_platform_public_key_path, "ROOMPAY_WECHAT_PLATFORM_PUBLIC_KEY_PATH"
        ),
        platform_public_key_id=_required(s, "wechat_platform_public_key_id"),
        base_url=s.wechat_base_url.rstrip("/"),
    )


def alipay_config(s: Settings) -> AlipayConfig:
    """The Alipay app configuration; raise SettingsError if incomplete."""
    return AlipayConfig(
        app_id=_required(s, "alipay_app_id"),
        seller_id=_required(s, "alipay_seller_id"),
        app_private_key_pem=_read(s.alipay_private_key_path, "ROOMPAY_ALIPAY_PRIVATE_KEY_PATH"),
        alipay_public_key_pem=_read(s.alipay_public_key_path, "ROOMPAY_ALIPAY_PUBLIC_KEY_PATH"),
        gateway_url=s.alipay_gateway_url,
    )


def build_providers(
    settings: Settings, clock: Clock | None = None
) -> dict[Wallet, PaymentProvider]:
    """Every provider that the settings configure."""
    clock = clock or SystemClock()
    providers: dict[Wallet, PaymentProvider] = {}
    if _wechat_configured(settings):
        providers[Wallet.WECHAT] = WechatPayProvider(wechat_config(settings), clock)
    if _alipay_configured(settings):
        providers[Wallet.ALIPAY] = AlipayProvider(alipay_config(settings), clock)
    return providers

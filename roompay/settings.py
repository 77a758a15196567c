"""Settings from the environment (`ROOMPAY_` prefix), validated once at start-up."""

from enum import StrEnum
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "insecure-development-secret-change-me"  # noqa: S105 - the named default production refuses


class Mode(StrEnum):
    """Where the process runs; production refuses development conveniences."""

    DEVELOPMENT = "development"
    PRODUCTION = "production"


class SettingsError(ValueError):
    """Settings that must not be used to start the server."""


class Settings(BaseSettings):
    """Everything the server needs to know, read from `ROOMPAY_*` variables."""

    model_config = SettingsConfigDict(env_prefix="ROOMPAY_", extra="ignore")

    mode: Mode = Mode.DEVELOPMENT
    data_dir: Path = Path("roompay-data")
    database_url: str | None = None
    mqtt_url: str = "embedded"
    mqtt_topic_root: str = "roompay/v1"
    public_base_url: str = "http://127.0.0.1:8000"
    secret_key: str = DEFAULT_SECRET
    token_ttl_s: int = Field(default=8 * 3600, gt=0)

    checkout_ttl_s: int = Field(default=300, ge=1, le=7200)
    start_deadline_s: int = Field(default=60, ge=5, le=3600)
    command_resend_s: float = Field(default=5.0, gt=0)
    require_device_online: bool = True
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    # A payment that arrives after the checkout expired: refund it, or run the
    # appliance if it is still online and idle.
    late_payment_policy: Literal["refund", "honour_if_free"] = "refund"
    query_after_s: float = Field(default=3.0, ge=0)
    query_interval_s: float = Field(default=5.0, gt=0)
    refund_max_attempts: int = Field(default=20, ge=1)
    full_refund_below_s: int = Field(default=60, ge=0)
    device_stale_after_s: float = Field(default=95.0, gt=0)
    maintenance_interval_s: float = Field(default=1.0, gt=0)
    # Bearer token Prometheus must send for /metrics; unset means open (development).
    metrics_token: str | None = None

    sandbox_enabled: bool = False
    sandbox_time_scale: float = Field(default=1.0, gt=0)

    wechat_mchid: str | None = None
    wechat_appid: str | None = None
    wechat_serial_no: str | None = None
    wechat_private_key_path: Path | None = None
    wechat_apiv3_key: str | None = None
    wechat_platform_public_key_path: Path | None = None
    wechat_platform_public_key_id: str | None = None
    wechat_base_url: str = "https://api.mch.weixin.qq.com"

    alipay_app_id: str | None = None
    alipay_seller_id: str | None = None
    alipay_private_key_path: Path | None = None
    alipay_public_key_path: Path | None = None
    alipay_gateway_url: str = "https://openapi.alipay.com/gateway.do"

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'roompay.db').resolve()}"

    @property
    def is_production(self) -> bool:
        """Tell whether production rules apply."""
        return self.mode is Mode.PRODUCTION

    @model_validator(mode="after")
    def _production_refuses_defaults(self) -> Self:
        if self.mode is not Mode.PRODUCTION:
            return self
        problems = []
        if self.secret_key == DEFAULT_SECRET or len(self.secret_key) < 32:
            problems.append("ROOMPAY_SECRET_KEY must be set to a random value of 32+ characters")
        if self.sandbox_enabled:
            problems.append("the provider sandbox cannot run in production")
        if "/sandbox" in self.wechat_base_url or "/sandbox" in self.alipay_gateway_url:
            problems.append("provider URLs point at a sandbox")
        if self.mqtt_url == "embedded":
            problems.append("the embedded MQTT broker is for development; set ROOMPAY_MQTT_URL")
        if not self.metrics_token or len(self.metrics_token) < 16:
            problems.append("ROOMPAY_METRICS_TOKEN must be set to 16+ characters")
        if not self.public_base_url.startswith("https://"):
            problems.append("ROOMPAY_PUBLIC_BASE_URL must be https:// (providers notify it)")
        if problems:
            raise SettingsError("production settings refused: " + "; ".join(problems))
        return self

"""Settings: development defaults, and the production rules that refuse them."""

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from roompay.settings import DEFAULT_SECRET, Mode, Settings, SettingsError

STRONG_SECRET = "k" * 32

COMPLETE_PRODUCTION: dict[str, Any] = {
    "mode": "production",
    "secret_key": STRONG_SECRET,
    "mqtt_url": "mqtts://iot:pw@mqtt.roompay.example:8883",
    "public_base_url": "https://pay.roompay.example",
    "database_url": "postgresql+psycopg://roompay@db.roompay.example/roompay",
    "metrics_token": "m" * 16,
}


@pytest.fixture(autouse=True)
def no_roompay_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without ROOMPAY_* variables (names are read case-insensitively)."""
    for name in list(os.environ):
        if name.upper().startswith("ROOMPAY_"):
            monkeypatch.delenv(name)


def production_refusal(**overrides: Any) -> SettingsError:
    """Build production settings with these overrides and return the one SettingsError raised."""
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({**COMPLETE_PRODUCTION, **overrides})
    errors = caught.value.errors(include_url=False)
    assert len(errors) == 1
    error = errors[0]["ctx"]["error"]
    assert isinstance(error, SettingsError)
    return error


def test_development_defaults_are_exactly_these() -> None:
    settings = Settings()

    assert settings.model_dump() == {
        "mode": Mode.DEVELOPMENT,
        "data_dir": Path("roompay-data"),
        "database_url": None,
        "mqtt_url": "embedded",
        "mqtt_topic_root": "roompay/v1",
        "public_base_url": "http://127.0.0.1:8000",
        "secret_key": DEFAULT_SECRET,
        "token_ttl_s": 8 * 3600,
        "checkout_ttl_s": 300,
        "start_deadline_s": 60,
        "command_resend_s": 5.0,
        "require_device_online": True,
        "max_body_bytes": 64 * 1024,
        "late_payment_policy": "refund",
        "query_after_s": 3.0,
        "query_interval_s": 5.0,
        "refund_max_attempts": 20,
        "full_refund_below_s": 60,
        "device_stale_after_s": 95.0,
        "maintenance_interval_s": 1.0,
        "metrics_token": None,
        "sandbox_enabled": False,
        "sandbox_time_scale": 1.0,
        "wechat_mchid": None,
        "wechat_appid": None,
        "wechat_serial_no": None,
        "wechat_private_key_path": None,
        "wechat_apiv3_key": None,
        "wechat_platform_public_key_path": None,
        "wechat_platform_public_key_id": None,
        "wechat_base_url": "https://api.mch.weixin.qq.com",
        "alipay_app_id": None,
        "alipay_seller_id": None,
        "alipay_private_key_path": None,
        "alipay_public_key_path": None,
        "alipay_gateway_url": "https://openapi.alipay.com/gateway.do",
    }
    assert settings.is_production is False


def test_development_accepts_every_convenience_production_refuses() -> None:
    settings = Settings.model_validate(
        {"secret_key": "short", "sandbox_enabled": True, "public_base_url": "http://localhost"}
    )

    assert settings.mode is Mode.DEVELOPMENT
    assert settings.secret_key == "short"
    assert settings.sandbox_enabled is True


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")

    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/data/roompay.db"


def test_default_data_dir_is_resolved_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    settings = Settings()

    assert settings.resolved_database_url == (
        f"sqlite:///{tmp_path.resolve()}/roompay-data/roompay.db"
    )


def test_an_explicit_database_url_wins_over_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://db/roompay")

    assert settings.resolved_database_url == "postgresql+psycopg://db/roompay"


def test_settings_are_read_from_roompay_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a production configuration in the environment
    for name, value in COMPLETE_PRODUCTION.items():
        monkeypatch.setenv(f"ROOMPAY_{name.upper()}", value)
    monkeypatch.setenv("ROOMPAY_TOKEN_TTL_S", "600")

    # When settings are built from it
    settings = Settings()

    # Then every variable was read
    assert settings.is_production is True
    assert settings.secret_key == STRONG_SECRET
    assert settings.mqtt_url == "mqtts://iot:pw@mqtt.roompay.example:8883"
    assert settings.public_base_url == "https://pay.roompay.example"
    assert settings.token_ttl_s == 600


def test_a_complete_production_configuration_is_accepted() -> None:
    settings = Settings.model_validate(COMPLETE_PRODUCTION)

    assert settings.mode is Mode.PRODUCTION
    assert settings.is_production is True
    assert settings.secret_key == STRONG_SECRET
    assert settings.sandbox_enabled is False
    assert settings.resolved_database_url == COMPLETE_PRODUCTION["database_url"]


def test_production_accepts_a_secret_of_exactly_32_characters() -> None:
    settings = Settings.model_validate({**COMPLETE_PRODUCTION, "secret_key": "s" * 32})

    assert settings.secret_key == "s" * 32


def test_production_refuses_the_default_secret() -> None:
    error = production_refusal(secret_key=DEFAULT_SECRET)

    assert str(error) == (
        "production settings refused: "
        "ROOMPAY_SECRET_KEY must be set to a random value of 32+ characters"
    )


def test_production_refuses_a_secret_of_31_characters() -> None:
    error = production_refusal(secret_key="s" * 31)

    assert str(error) == (
        "production settings refused: "
        "ROOMPAY_SECRET_KEY must be set to a random value of 32+ characters"
    )


def test_production_refuses_open_metrics() -> None:
    error = production_refusal(metrics_token=None)

    assert str(error) == (
        "production settings refused: ROOMPAY_METRICS_TOKEN must be set to 16+ characters"
    )


def test_production_refuses_a_metrics_token_of_15_characters() -> None:
    error = production_refusal(metrics_token="m" * 15)

    assert "ROOMPAY_METRICS_TOKEN must be set" in str(error)


def test_production_refuses_the_provider_sandbox() -> None:
    error = production_refusal(sandbox_enabled=True)

    assert str(error) == (
        "production settings refused: the provider sandbox cannot run in production"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(
            {"wechat_base_url": "https://pay.roompay.example/sandbox/wechatpay"}, id="wechat"
        ),
        pytest.param(
            {"alipay_gateway_url": "https://pay.roompay.example/sandbox/alipay/gateway.do"},
            id="alipay",
        ),
    ],
)
def test_production_refuses_provider_urls_pointing_at_a_sandbox(overrides: dict[str, str]) -> None:
    error = production_refusal(**overrides)

    assert str(error) == "production settings refused: provider URLs point at a sandbox"


def test_production_refuses_the_embedded_broker() -> None:
    error = production_refusal(mqtt_url="embedded")

    assert str(error) == (
        "production settings refused: "
        "the embedded MQTT broker is for development; set ROOMPAY_MQTT_URL"
    )


@pytest.mark.parametrize(
    "url", ["http://pay.roompay.example", "pay.roompay.example", "ftp://pay.roompay.example"]
)
def test_production_refuses_a_public_url_that_is_not_https(url: str) -> None:
    error = production_refusal(public_base_url=url)

    assert str(error) == (
        "production settings refused: "
        "ROOMPAY_PUBLIC_BASE_URL must be https:// (providers notify it)"
    )


def test_production_with_every_default_lists_every_problem_in_order() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({"mode": "production", "sandbox_enabled": True})

    error = caught.value.errors(include_url=False)[0]["ctx"]["error"]
    assert str(error) == (
        "production settings refused: "
        "ROOMPAY_SECRET_KEY must be set to a random value of 32+ characters; "
        "the provider sandbox cannot run in production; "
        "the embedded MQTT broker is for development; set ROOMPAY_MQTT_URL; "
        "ROOMPAY_METRICS_TOKEN must be set to 16+ characters; "
        "ROOMPAY_PUBLIC_BASE_URL must be https:// (providers notify it)"
    )

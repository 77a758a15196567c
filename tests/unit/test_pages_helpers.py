"""Pure helpers of the pages: which wallet opened the page, which language to speak."""

import pytest

from roompay.web.i18n import TEXTS, pick_language
from roompay.web.pages import wallet_from_user_agent

WECHAT_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.47(0x18002f2c) NetType/WIFI "
    "Language/zh_CN"
)
WECHAT_ANDROID = (
    "Mozilla/5.0 (Linux; Android 13; V2227A Build/TP1A.220624.014; wv) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Version/4.0 Chrome/111.0.5563.116 Mobile Safari/537.36 XWEB/1110017 "
    "MMWEBSDK/20231202 MMWEBID/2147 MicroMessenger/8.0.44.2502(0x28002C51) WeChat/arm64 "
    "Weixin NetType/WIFI Language/zh_CN ABI/arm64"
)
ALIPAY_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 Ariver/1.1.0 AliApp(AP/10.5.36.6000) Nebula WK "
    "RVKType(0) AlipayDefined(nt:WIFI,ws:390|780|3.0) AlipayClient/10.5.36.6000 "
    "Language/zh-Hans Region/CN NebulaX/1.0.0"
)
ALIPAY_ANDROID = (
    "Mozilla/5.0 (Linux; U; Android 12; zh-CN; M2102K1C Build/SKQ1.211006.001) "
    "AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 Chrome/69.0.3497.100 UWS/3.22.2.59 "
    "Mobile Safari/537.36 UCBS/3.22.2.59_230213144018 ChannelId(0) NebulaSDK/1.8.100112 "
    "Nebula AlipayDefined(nt:WIFI,ws:393|0|2.75,ac:sp) AliApp(AP/10.3.80.8000) "
    "AlipayClient/10.3.80.8000 Language/zh-Hans useStatusBar/true Region/CN Ariver/1.0.0"
)
SAFARI_IOS = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
CHROME_DESKTOP = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)


@pytest.mark.parametrize(
    ("user_agent", "wallet"),
    [
        pytest.param(WECHAT_IOS, "wechat", id="wechat-ios"),
        pytest.param(WECHAT_ANDROID, "wechat", id="wechat-android"),
        pytest.param(ALIPAY_IOS, "alipay", id="alipay-ios"),
        pytest.param(ALIPAY_ANDROID, "alipay", id="alipay-android"),
        pytest.param(SAFARI_IOS, None, id="safari-ios"),
        pytest.param(CHROME_DESKTOP, None, id="chrome-desktop"),
        pytest.param("", None, id="empty"),
    ],
)
def test_wallet_from_user_agent_names_the_wallet_app_that_opened_the_page(
    user_agent: str, wallet: str | None
) -> None:
    assert wallet_from_user_agent(user_agent) == wallet


def test_wallet_from_user_agent_matches_the_app_token_case_sensitively() -> None:
    assert wallet_from_user_agent("Mozilla/5.0 micromessenger/8.0") is None
    assert wallet_from_user_agent("Mozilla/5.0 alipayclient/10.5") is None


def test_the_two_languages_are_zh_cn_and_en_with_the_same_words() -> None:
    assert list(TEXTS) == ["zh-CN", "en"]
    assert TEXTS["zh-CN"].keys() == TEXTS["en"].keys()


@pytest.mark.parametrize(
    ("query_lang", "accept_language", "expected"),
    [
        pytest.param("en", "zh-CN,zh;q=0.9", "en", id="query-en-beats-header-zh"),
        pytest.param("zh-CN", "en-US,en;q=0.9", "zh-CN", id="query-zh-beats-header-en"),
        pytest.param("fr", "en-GB,en;q=0.9", "en", id="unknown-query-falls-back-to-header"),
        pytest.param("EN", None, "zh-CN", id="query-is-case-sensitive"),
        pytest.param("zh", "en", "en", id="query-zh-without-region-is-unknown"),
        pytest.param(None, "en", "en", id="header-en"),
        pytest.param(None, "EN-us", "en", id="header-is-case-insensitive"),
        pytest.param(None, "zh-CN,zh;q=0.9,en;q=0.8", "zh-CN", id="header-zh"),
        pytest.param(None, "fr-FR,fr;q=0.9", "zh-CN", id="header-other-defaults-to-zh"),
        pytest.param(None, "fr-FR,en;q=0.9", "zh-CN", id="only-the-first-header-language"),
        pytest.param(None, "", "zh-CN", id="empty-header"),
        pytest.param(None, None, "zh-CN", id="nothing"),
        pytest.param("", None, "zh-CN", id="empty-query"),
    ],
)
def test_pick_language_prefers_the_query_then_the_header_then_chinese(
    query_lang: str | None, accept_language: str | None, expected: str
) -> None:
    assert pick_language(query_lang, accept_language) == expected

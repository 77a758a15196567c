"""The guest's side in a real browser: buying on the panel, the sticker page's wallet."""

import re

import httpx
from playwright.sync_api import expect

from tests.browser.conftest import Contexts, screenshot
from tests.support.devices import device_agents
from tests.support.server import Stack

WECHAT_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 MicroMessenger/8.0.47(0x18002f2c) NetType/WIFI "
    "Language/zh_CN"
)
ALIPAY_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 16_6 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Mobile/15E148 Ariver/1.1.0 AliApp(AP/10.5.36.6000) Nebula WK "
    "AlipayClient/10.5.36.6000 Language/zh-Hans Region/CN NebulaX/1.0.0"
)


def test_a_guest_buys_a_program_on_the_panel_and_sees_the_countdown_start(
    stack: Stack, contexts: Contexts
) -> None:
    device = stack.device_codes[0]
    # Given the dryer online, running at real speed so the countdown can be read
    with device_agents(stack, [device], time_scale=1.0):
        page = contexts.new().new_page()
        page.goto(f"/panel/{device}?lang=en")
        # When the guest picks the 30-minute program and WeChat Pay
        page.click('[data-program="dry30"]')
        with page.expect_response("**/api/v1/checkout") as answer:
            page.click('[data-wallet="wechat"]')
        checkout = answer.value.json()
        # Then the QR code appears with its price and time to pay
        expect(page.locator("#qr")).to_be_visible()
        expect(page.locator("#pay-title")).to_have_text("Scan with WeChat to pay")
        expect(page.locator("#amount")).to_have_text("¥8.00")
        expect(page.locator("#qr-countdown")).to_have_text(re.compile(r"^(5:00|4:5\d)$"))
        assert page.locator("#qr").get_attribute("data-content") == checkout["qr"]
        screenshot("panel-qr", page)
        # When the guest pays with the phone
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            paid = http.post("/sandbox/pay", json={"qr": checkout["qr"]})
        assert paid.status_code == 200
        # Then the panel shows the appliance running and counting down from 30 minutes
        expect(page.locator("#status-text")).to_have_text("Running")
        expect(page.locator("#run-countdown")).to_have_text(re.compile(r"^(30:00|29:[0-5]\d)$"))
        expect(page.locator("body")).to_have_attribute("data-status", "running")
        screenshot("panel-running", page)


def test_the_sticker_page_offers_the_wallet_of_the_app_that_opened_it(
    stack: Stack, contexts: Contexts
) -> None:
    device = stack.device_codes[3]
    seen = {}
    with device_agents(stack, [device]):
        for name, user_agent in (("wechat", WECHAT_UA), ("alipay", ALIPAY_UA), ("browser", None)):
            page = contexts.new(user_agent).new_page()
            page.goto(f"/d/{device}")
            page.click('[data-program="aroma1h"]')
            buttons = page.locator("[data-wallet]")
            expect(buttons.first).to_be_enabled()
            seen[name] = [buttons.nth(i).inner_text() for i in range(buttons.count())]
            screenshot(f"sticker-{name}", page)
    assert seen == {
        "wechat": ["微信支付"],
        "alipay": ["支付宝"],
        "browser": ["微信支付", "支付宝"],
    }


def test_the_panel_says_when_the_appliance_is_offline(stack: Stack, contexts: Contexts) -> None:
    page = contexts.new().new_page()
    page.goto(f"/panel/{stack.device_codes[1]}?lang=en")
    expect(page.locator("#unavailable")).to_have_text(
        "This appliance is offline; please contact the front desk"
    )
    expect(page.locator("#choose")).to_be_hidden()
    screenshot("panel-offline", page)

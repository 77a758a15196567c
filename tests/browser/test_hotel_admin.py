"""Hotel administration in a real browser: webhooks, prices, comps, money pages."""

from datetime import timedelta

import httpx
from playwright.sync_api import BrowserContext, Page, expect

from roompay.services.auth import Role
from roompay.services.catalog import get_device
from roompay.services.dashboard import hotel_today
from roompay.services.seed import create_hotel, ensure_operator
from roompay.store.db import transaction
from roompay.store.models import Hotel
from tests.browser.conftest import PASSWORD, Contexts, add_user, screenshot
from tests.functional.test_webhooks import Receiver, receiving
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for


def _hotel(stack: Stack) -> tuple[int, str]:
    with stack.runtime.ctx.sessions() as session:
        hotel_id = get_device(session, stack.device_codes[0]).hotel_id
        return hotel_id, session.get_one(Hotel, hotel_id).code


def _sign_in(context: BrowserContext, username: str, lang: str = "en") -> Page:
    page = context.new_page()
    page.goto(f"/login?lang={lang}")
    page.fill('input[name="username"]', username)
    page.fill('input[name="password"]', PASSWORD)
    page.click('button[type="submit"]')
    expect(page).to_have_url("/dashboard")
    return page


def test_a_manager_registers_a_webhook_and_sees_its_records_delivered(
    stack: Stack, contexts: Contexts
) -> None:
    hotel_id, hotel = _hotel(stack)
    add_user(stack, "manager-a", Role.MANAGER, hotel_id)
    device = stack.device_codes[0]
    with receiving(Receiver([204])) as receiver, device_agents(stack, [device]):
        # Given a manager who registers the hotel system's URL on the webhooks page
        page = _sign_in(contexts.new(phone=False), "manager-a")
        page.goto("/dashboard/webhooks?lang=en")
        expect(page.locator(f"#webhook-url-{hotel}")).to_have_text("No receiver URL registered")
        page.fill(f'[data-hotel="{hotel}"] input[name="url"]', receiver.url)
        page.click(f'[data-hotel="{hotel}"] form button[type="submit"]')
        # Then the signing secret is shown, this once
        secret = page.locator("#webhook-secret code").inner_text()
        assert secret.startswith("whsec_")
        receiver.secret = secret
        expect(page.locator(f"#webhook-url-{hotel} code")).to_have_text(receiver.url)
        # When a guest pays for a program that runs to its end
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            created = http.post(
                "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": "wechat"}
            ).json()
            assert http.post("/sandbox/pay", json={"qr": created["qr"]}).status_code == 200
        wait_for(lambda: len(receiver.received) == 3, 15, "three records")
        # Then the page lists the three records as delivered, newest first
        page.goto("/dashboard/webhooks?lang=en")
        rows = page.locator(f'[data-hotel="{hotel}"] tr[data-delivery]')
        assert [
            (rows.nth(i).get_attribute("data-event"), rows.nth(i).get_attribute("data-status"))
            for i in range(rows.count())
        ] == [("ended", "delivered"), ("started", "delivered"), ("paid", "delivered")]
        expect(page.locator('[data-count="delivered"]')).to_have_text("Delivered 3")
        expect(page.locator("#webhook-secret")).to_have_count(0)
        screenshot("webhooks", page)
    assert receiver.bad_signatures == 0


def test_a_manager_changes_a_price_that_the_panel_then_shows(
    stack: Stack, contexts: Contexts
) -> None:
    hotel_id, hotel = _hotel(stack)
    add_user(stack, "manager-a", Role.MANAGER, hotel_id)
    page = _sign_in(contexts.new(phone=False), "manager-a")
    page.goto("/dashboard/programs?lang=en")
    row = page.locator(f'[data-hotel="{hotel}"] tr[data-program="dry30"]')
    expect(row.locator('input[name="price"]')).to_have_value("8.00")
    # A price of nothing is refused with a reason
    row.locator('input[name="price"]').fill("0")
    row.locator('button[type="submit"]').click()
    expect(page.locator("#program-error")).to_contain_text(f"{hotel}/dry30")
    # When the manager sets dry30 to 9.50 and takes dry60 off sale
    row = page.locator(f'[data-hotel="{hotel}"] tr[data-program="dry30"]')
    row.locator('input[name="price"]').fill("9.50")
    row.locator('button[type="submit"]').click()
    expect(page.locator("#program-saved")).to_have_text(f"Saved · {hotel}/dry30")
    dry60 = page.locator(f'[data-hotel="{hotel}"] tr[data-program="dry60"]')
    dry60.locator('input[name="active"]').uncheck()
    dry60.locator('button[type="submit"]').click()
    expect(page.locator("#program-saved")).to_have_text(f"Saved · {hotel}/dry60")
    expect(page.locator('tr[data-program="dry30"] input[name="price"]')).to_have_value("9.50")
    screenshot("programs", page)
    # Then the appliance's panel offers dry30 at 9.50 and no dry60
    panel = contexts.new().new_page()
    panel.goto(f"/panel/{stack.device_codes[0]}?lang=en")
    expect(panel.locator("body")).to_contain_text("¥9.50")
    expect(panel.locator("body")).not_to_contain_text("Dry 60 min")


def test_the_front_desk_comps_a_run_and_the_feed_shows_it(stack: Stack, contexts: Contexts) -> None:
    hotel_id, _hotel_code = _hotel(stack)
    add_user(stack, "desk", Role.FRONT_DESK, hotel_id)
    device = stack.device_codes[0]
    with device_agents(stack, [device]):
        context = contexts.new(phone=False)
        # Given the front desk with the live feed open
        feed = _sign_in(context, "desk", lang="zh-CN")
        expect(feed.locator("body")).to_have_attribute("data-feed", "open")
        # When they start a free run from the room's tile, with a reason
        form = context.new_page()
        form.goto(f"/dashboard/comp?device={device}&lang=zh-CN")
        expect(form.locator("#comp-device")).to_have_value(device)
        form.select_option("#comp-program", "dry30")
        form.fill("#comp-reason", "客人投诉烘干不彻底")
        screenshot("comp", form)
        form.click('#comp-form button[type="submit"]')
        # Then its timeline says it is a comp, with the reason
        expect(form.locator("#comp-done")).to_be_visible()
        expect(form.locator("#order-comp")).to_have_text("免单")
        expect(form.locator("#order-amount")).to_have_text("¥0.00")
        expect(form.locator('#timeline li[data-event="comped"]')).to_contain_text(
            "免费启动 · 客人投诉烘干不彻底"
        )
        order_id = form.locator("#order-id").inner_text()
        # And the feed shows it as a comp, then the run, without reloading
        comped = feed.locator(f'#feed li[data-order="{order_id}"][data-event="comped"]')
        expect(comped).to_have_attribute("data-comp", "1")
        expect(comped).to_contain_text(
            f"免费启动 房间 101 · 干衣机 · dry30 · ¥0.00 · 免单 · {order_id[:8]}"
        )
        expect(
            feed.locator(f'#feed li[data-order="{order_id}"][data-event="ended"]')
        ).to_be_visible()
        screenshot("dashboard-comp-feed", feed)
        form.reload()
        screenshot("order-comp", form)


def test_the_operator_reads_statements_reconciliation_and_revenue_by_hotel(
    stack: Stack, contexts: Contexts
) -> None:
    _hotel_id, hotel = _hotel(stack)
    with transaction(stack.runtime.ctx.sessions) as session:
        create_hotel(session, ensure_operator(session, "op", "Op"), "other", "Other Hotel", 2)
    add_user(stack, "operator", Role.ADMIN, None)
    today = hotel_today(stack.clock.now())
    month = (today.replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    yesterday = (today - timedelta(days=1)).isoformat()
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        token = http.post(
            "/api/v1/auth/token", data={"username": "operator", "password": PASSWORD}
        ).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        for code in (hotel, "other"):
            assert http.post(f"/api/v1/hotels/{code}/statements/{month}", headers=auth).is_success
        assert http.post(f"/api/v1/reconciliations/{yesterday}", headers=auth).is_success
    page = _sign_in(contexts.new(phone=False), "operator")
    page.goto("/dashboard/statements?lang=en")
    expect(page.locator("#statements tr[data-statement]")).to_have_count(2)
    screenshot("statements", page)
    page.click(f'tr[data-statement="{hotel}/{month}"] a:text("Printable")')
    expect(page.locator("#hotel-share")).to_have_text("¥0.00")
    page.goto("/dashboard/reconciliation?lang=en")
    expect(page.locator("#reports tr[data-report]")).to_have_count(2)
    screenshot("reconciliation", page)
    page.goto("/dashboard/revenue?lang=en")
    expect(page.locator("#revenue-by-hotel .bar-label")).to_have_text([hotel, "other"])
    screenshot("revenue-by-hotel", page)


def test_the_front_desk_stops_a_run_from_its_timeline(stack: Stack, contexts: Contexts) -> None:
    hotel_id, _hotel_code = _hotel(stack)
    add_user(stack, "desk", Role.FRONT_DESK, hotel_id)
    device = stack.device_codes[0]
    # The 30-minute program lasts 90 s of wall time here: long enough to stop it
    with device_agents(stack, [device], time_scale=20.0):
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            created = http.post(
                "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": "wechat"}
            ).json()
            assert http.post("/sandbox/pay", json={"qr": created["qr"]}).status_code == 200
            order_id = created["order_id"]
            wait_for(
                lambda: http.get(f"/api/v1/orders/{order_id}").json()["status"] == "running",
                20,
                "running",
            )
        # Given the front desk on the running order's timeline
        page = _sign_in(contexts.new(phone=False), "desk")
        page.goto(f"/dashboard/orders/{order_id}?lang=en")
        expect(page.locator("#order-status")).to_have_text("Running")
        # When they stop the run with a reason
        page.fill('#stop-form input[name="reason"]', "smoke from the vent")
        page.click('#stop-form button[type="submit"]')
        # Then the stop is sent, the appliance ends the run and the unused share is refunded
        expect(page.locator("#stop-done")).to_have_text("Stop sent to the appliance")
        expect(page.locator('#timeline li[data-event="stop_requested"]')).to_contain_text(
            "Stop requested by staff · smoke from the vent"
        )
        for _ in range(100):
            page.reload()
            if page.locator('#timeline li[data-event="ended"]').count():
                break
            page.wait_for_timeout(100)
        expect(page.locator('#timeline li[data-event="ended"]')).to_be_visible()
        expect(page.locator("#stop-form")).to_have_count(0)
        screenshot("order-stopped", page)

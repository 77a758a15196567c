"""The staff's side in a real browser: the live feed, and a hotel seeing only itself."""

import httpx
from playwright.sync_api import BrowserContext, Page, expect

from roompay.services.auth import Role
from roompay.services.catalog import get_device
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import transaction
from tests.browser.conftest import PASSWORD, Contexts, add_user, screenshot
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.timeline import PAID_RUN_STEPS
from tests.support.waiting import wait_for


def _hotel_id(stack: Stack) -> int:
    with stack.runtime.ctx.sessions() as session:
        return get_device(session, stack.device_codes[0]).hotel_id


def _sign_in(context: BrowserContext, username: str) -> Page:
    page = context.new_page()
    page.goto("/login?lang=en")
    page.fill('input[name="username"]', username)
    page.fill('input[name="password"]', PASSWORD)
    page.click('button[type="submit"]')
    expect(page).to_have_url("/dashboard")
    return page


def _buy(stack: Stack, device: str, wait_completed: bool) -> str:
    with httpx.Client(base_url=stack.base_url, timeout=10) as http:
        created = http.post(
            "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": "alipay"}
        ).json()
        assert http.post("/sandbox/pay", json={"qr": created["qr"]}).status_code == 200
        order_id = str(created["order_id"])
        if wait_completed:
            wait_for(
                lambda: http.get(f"/api/v1/orders/{order_id}").json()["status"] == "completed",
                15,
                "the order to complete",
            )
    return order_id


def test_the_front_desk_sees_a_consumption_appear_live(stack: Stack, contexts: Contexts) -> None:
    # Given the front desk on the dashboard, its live feed connected
    add_user(stack, "desk", Role.FRONT_DESK, _hotel_id(stack))
    device = stack.device_codes[0]
    with device_agents(stack, [device]):
        page = _sign_in(contexts.new(phone=False), "desk")
        expect(page.locator("body")).to_have_attribute("data-feed", "open")
        expect(page.locator("#feed-empty")).to_be_visible()
        # When a guest pays for a program in room 101 and it runs
        order_id = _buy(stack, device, wait_completed=False)
        # Then each step shows up in the feed without reloading, the last one first
        ended = page.locator(f'#feed li[data-order="{order_id}"][data-event="ended"]')
        expect(ended).to_be_visible()
        expect(ended).to_contain_text(
            f"运行结束 房间 101 · 干衣机 · dry30 · ¥8.00 · 支付宝 · {order_id[:8]}"
        )
        steps = page.locator(f'#feed li[data-order="{order_id}"]')
        assert [steps.nth(i).get_attribute("data-event") for i in range(steps.count())] == [
            "ended",
            "started",
            "command_accepted",
            "command_sent",
            "command_queued",
            "paid",
            "qr_issued",
            "created",
        ]
        expect(page.locator(f'[data-device="{device}"] .state')).to_have_text("空闲")
        screenshot("dashboard-live-feed", page)
        # And the order's timeline lists the same steps
        page.click(f'#feed li[data-event="ended"] a[href="/dashboard/orders/{order_id}"]')
        expect(page.locator("#order-id")).to_have_text(order_id)
        events = page.locator("#timeline li")
        assert [
            events.nth(i).get_attribute("data-event") for i in range(events.count())
        ] == PAID_RUN_STEPS
        # When the front desk refunds ¥3.00 with a reason
        page.fill('input[name="amount"]', "3.00")
        page.fill('input[name="reason"]', "dryer left clothes damp")
        page.click('#refund-form button[type="submit"]')
        # Then the refund is recorded on the timeline
        expect(page.locator("#refund-done")).to_be_visible()
        expect(page.locator('#timeline li[data-event="refund_requested"]')).to_contain_text(
            "申请退款 · dryer left clothes damp · ¥3.00"
        )
        screenshot("order-timeline", page)


def test_a_hotel_manager_sees_nothing_of_another_hotel(stack: Stack, contexts: Contexts) -> None:
    # Given hotel B with its own appliance, and a paid, completed order in each hotel
    with transaction(stack.runtime.ctx.sessions) as session:
        operator = ensure_operator(session, "op", "Test Operator")
        other = create_hotel(session, operator, "other", "Other Hotel", rooms=2)
        (device_b,) = place_devices(session, other, 1, code_prefix="OTH")
    add_user(stack, "manager-a", Role.MANAGER, _hotel_id(stack))
    device_a = stack.device_codes[0]
    with device_agents(stack, [device_a, device_b]):
        order_a = _buy(stack, device_a, wait_completed=True)
        order_b = _buy(stack, device_b, wait_completed=True)
        page = _sign_in(contexts.new(phone=False), "manager-a")
        # Then the room grid holds only hotel A's appliances
        rooms = page.locator("[data-device]")
        assert sorted(
            str(rooms.nth(i).get_attribute("data-device")) for i in range(rooms.count())
        ) == sorted(stack.device_codes)
        screenshot("dashboard-manager", page)
        # And the order search finds only hotel A's order, and nothing by B's id
        page.goto("/dashboard/orders?lang=en")
        found = page.locator("#orders tr[data-order]")
        assert [found.nth(i).get_attribute("data-order") for i in range(found.count())] == [order_a]
        screenshot("order-search", page)
        page.goto(f"/dashboard/orders?lang=en&q={order_b[:8]}")
        expect(page.locator("#no-orders")).to_have_text("No orders match")
        page.goto(f"/dashboard/orders?lang=en&device={device_b}")
        expect(page.locator("#no-orders")).to_have_text("No orders match")
        # And B's timeline is not found
        response = page.goto(f"/dashboard/orders/{order_b}?lang=en")
        assert response is not None
        assert response.status == 404
        expect(page.locator("#message-title")).to_have_text("Not found")
        screenshot("timeline-other-hotel-not-found", page)
        # And the revenue counts hotel A's order only
        page.goto("/dashboard/revenue?lang=en")
        expect(page.locator("#revenue-net")).to_have_text("¥8.00")
        expect(page.locator("svg.bars rect")).to_have_count(15)
        screenshot("revenue", page)

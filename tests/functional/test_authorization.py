"""Every route of the app against every role: who may do what, with exact statuses.

A new route makes this test fail until it is added to `EXPECTED`, so each route's
access rule is decided on purpose.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from roompay.services.auth import Role, create_user
from roompay.services.catalog import get_device
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import transaction
from roompay.store.models import Hotel
from roompay.web.app import create_app
from tests.support.devices import device_agents
from tests.support.server import Stack

PASSWORD = "correct horse"
ROLES = ("anonymous", "admin", "manager", "front_desk", "technician")

# (method, path) -> statuses for anonymous, admin, manager of A, front desk of A, technician of A.
EXPECTED: dict[tuple[str, str], tuple[int, int, int, int, int]] = {
    # Operations
    ("GET", "/healthz"): (200, 200, 200, 200, 200),
    ("GET", "/readyz"): (200, 200, 200, 200, 200),
    ("GET", "/metrics"): (200, 200, 200, 200, 200),
    # Guest API: the order id is the guest's capability; checkout validates before anything
    ("GET", "/api/v1/devices/{code}/programs"): (200, 200, 200, 200, 200),
    ("POST", "/api/v1/checkout"): (422, 422, 422, 422, 422),
    ("GET", "/api/v1/orders/{order_id}"): (200, 200, 200, 200, 200),
    ("GET", "/api/v1/orders/{order_id}/qr.svg"): (200, 200, 200, 200, 200),
    # Provider notifications authenticate by signature, not by user: unsigned is refused
    ("POST", "/api/v1/notify/wechatpay"): (400, 400, 400, 400, 400),
    ("POST", "/api/v1/notify/alipay"): (400, 400, 400, 400, 400),
    ("POST", "/api/v1/notify/wechatpay/refund"): (400, 400, 400, 400, 400),
    # Staff API
    ("POST", "/api/v1/auth/token"): (401, 200, 200, 200, 200),
    ("GET", "/api/v1/devices"): (401, 200, 200, 200, 200),
    # Every staff role may stop a run in its hotel; device A is idle, so there is none
    ("POST", "/api/v1/devices/{code}/stop"): (401, 409, 409, 409, 409),
    # The order is awaiting payment: staff may refund, but not yet
    ("POST", "/api/v1/orders/{order_id}/refunds"): (401, 409, 409, 409, 403),
    ("GET", "/api/v1/orders/{order_id}/refunds"): (401, 200, 200, 200, 403),
    ("GET", "/api/v1/feed"): (401, 200, 200, 200, 403),
    # Money: hotel staff read their own statements (none is issued yet: 404); only the
    # operator issues statements and reconciles (no report yet: 404); technicians see no money
    ("GET", "/api/v1/hotels/{hotel}/statements/{period}"): (401, 404, 404, 404, 403),
    ("POST", "/api/v1/hotels/{hotel}/statements/{period}"): (401, 201, 403, 403, 403),
    ("GET", "/api/v1/reconciliations/{bill_date}"): (401, 404, 403, 403, 403),
    ("POST", "/api/v1/reconciliations/{bill_date}"): (401, 200, 403, 403, 403),
    # Guest pages
    ("GET", "/panel/{code}"): (200, 200, 200, 200, 200),
    ("GET", "/panel/{code}/state.json"): (200, 200, 200, 200, 200),
    ("GET", "/d/{code}"): (200, 200, 200, 200, 200),
    # Staff pages: the anonymous are sent to sign in
    ("GET", "/"): (303, 303, 303, 303, 303),
    ("GET", "/login"): (200, 200, 200, 200, 200),
    ("POST", "/login"): (401, 303, 303, 303, 303),
    # A signed-in logout needs the form's token; this request has none
    ("POST", "/logout"): (303, 403, 403, 403, 403),
    ("GET", "/dashboard"): (303, 200, 200, 200, 200),
    ("GET", "/dashboard/rooms.json"): (401, 200, 200, 200, 200),
    ("GET", "/dashboard/orders"): (303, 200, 200, 200, 403),
    ("GET", "/dashboard/orders/{order_id}"): (303, 200, 200, 200, 403),
    # Without the form's token the refund form is refused before anything is looked up
    ("POST", "/dashboard/orders/{order_id}/refund"): (303, 403, 403, 403, 403),
    ("POST", "/dashboard/orders/{order_id}/stop"): (303, 403, 403, 403, 403),
    ("GET", "/dashboard/revenue"): (303, 200, 200, 403, 403),
    # Hotel API: webhooks and prices are for managers and the operator (removing is idempotent)
    ("PUT", "/api/v1/hotels/{hotel}/webhook"): (401, 200, 200, 403, 403),
    ("GET", "/api/v1/hotels/{hotel}/webhook"): (401, 200, 200, 403, 403),
    ("DELETE", "/api/v1/hotels/{hotel}/webhook"): (401, 204, 204, 403, 403),
    ("POST", "/api/v1/hotels/{hotel}/webhook/retry"): (401, 200, 200, 403, 403),
    ("GET", "/api/v1/hotels/{hotel}/programs"): (401, 200, 200, 403, 403),
    ("PATCH", "/api/v1/hotels/{hotel}/programs/{program}"): (401, 200, 200, 403, 403),
    # Comps are for the front desk too; the appliance is offline once the walk begins
    ("POST", "/api/v1/devices/{code}/comps"): (401, 409, 409, 409, 403),
    # Dashboard pages of the hotel API and the money; forms without their token are refused
    ("GET", "/dashboard/comp"): (303, 200, 200, 200, 403),
    ("POST", "/dashboard/comp"): (303, 403, 403, 403, 403),
    ("GET", "/dashboard/programs"): (303, 200, 200, 403, 403),
    ("POST", "/dashboard/programs/{hotel}/{program}"): (303, 403, 403, 403, 403),
    ("GET", "/dashboard/webhooks"): (303, 200, 200, 403, 403),
    ("POST", "/dashboard/webhooks/{hotel}"): (303, 403, 403, 403, 403),
    ("POST", "/dashboard/webhooks/{hotel}/retry"): (303, 403, 403, 403, 403),
    ("GET", "/dashboard/statements"): (303, 200, 200, 403, 403),
    # The statement the operator issued above, through the API
    ("GET", "/dashboard/statements/{hotel}/{period}"): (303, 200, 200, 403, 403),
    ("GET", "/dashboard/reconciliation"): (303, 200, 403, 403, 403),
}

# A's staff on hotel B's order: told it does not exist. The admin sees every hotel.
OBJECT_LEVEL: dict[tuple[str, str], tuple[int, int, int, int]] = {
    ("GET", "/api/v1/orders/{order_id}/refunds"): (200, 404, 404, 403),
    ("POST", "/api/v1/orders/{order_id}/refunds"): (409, 404, 404, 403),
    ("GET", "/dashboard/orders/{order_id}"): (200, 404, 404, 403),
}

# A's staff on hotel B's hotel and appliance: told they do not exist.
HOTEL_LEVEL: dict[tuple[str, str], tuple[int, int, int, int]] = {
    ("PUT", "/api/v1/hotels/{hotel}/webhook"): (200, 404, 403, 403),
    ("GET", "/api/v1/hotels/{hotel}/webhook"): (200, 404, 403, 403),
    ("GET", "/api/v1/hotels/{hotel}/programs"): (200, 404, 403, 403),
    ("PATCH", "/api/v1/hotels/{hotel}/programs/{program}"): (200, 404, 403, 403),
    ("POST", "/api/v1/devices/{code}/comps"): (409, 404, 404, 403),
    # Hotel B has no statement: the operator is told so, A's manager that B does not exist
    ("GET", "/dashboard/statements/{hotel}/{period}"): (404, 404, 403, 403),
    # B's appliance is idle: the admin is told so, A's staff that it does not exist
    ("POST", "/api/v1/devices/{code}/stop"): (409, 404, 404, 404),
}

# Valid bodies, so that each answer is about who asks, not about what they sent.
JSON_BODIES: dict[str, object] = {
    "/api/v1/hotels/{hotel}/webhook": {"url": "http://127.0.0.1:9/hook"},
    "/api/v1/hotels/{hotel}/programs/{program}": {"amount_fen": 800},
    "/api/v1/devices/{code}/comps": {"program": "dry30", "reason": "authorization walk"},
    "/api/v1/devices/{code}/stop": {"reason": "authorization walk"},
}

# Complete forms whose only fault is a forged token.
FORM_BODIES: dict[str, dict[str, str]] = {
    "/dashboard/comp": {
        "device": "x",
        "program": "dry30",
        "reason": "walk",
        "key": "k1",
        "csrf": "forged",
    },
    "/dashboard/programs/{hotel}/{program}": {"price": "8.00", "active": "on", "csrf": "forged"},
    "/dashboard/webhooks/{hotel}": {"url": "http://127.0.0.1:9/hook", "csrf": "forged"},
    "/dashboard/webhooks/{hotel}/retry": {"csrf": "forged"},
    "/dashboard/orders/{order_id}/stop": {"reason": "walk", "csrf": "forged"},
}

SKIPPED_PREFIXES = ("/sandbox", "/static", "/docs", "/redoc", "/openapi.json")


@dataclass
class World:
    """Two hotels, a user per role in hotel A, an order in each hotel."""

    stack: Stack
    device_a: str
    order_a: str
    order_b: str
    cookies: dict[str, dict[str, str]]  # role -> the dashboard cookie
    usernames: dict[str, str]
    hotel_a: str
    hotel_b: str
    device_b: str


def _flatten(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    """Every route with its URL path, looking inside included routers.

    Newer FastAPI keeps an included router nested, with the prefix given at inclusion.
    """
    for route in routes:
        nested = getattr(route, "original_router", None)
        if nested is not None:
            inner = getattr(getattr(route, "include_context", None), "prefix", "")
            yield from _flatten(nested.routes, prefix + inner)
        else:
            yield prefix + getattr(route, "path", ""), route


def _app_routes(stack: Stack) -> set[tuple[str, str]]:
    app = create_app(stack.runtime, manage_runtime=False)
    found = set()
    for path, route in _flatten(app.routes):
        if path.startswith(SKIPPED_PREFIXES):
            continue
        methods = (route.methods or set()) if isinstance(route, APIRoute) else {"?"}
        found |= {(m, path) for m in methods - {"HEAD"}}
    return found


@pytest.fixture
def world(stack: Stack) -> World:
    with transaction(stack.runtime.ctx.sessions) as session:
        hotel_a = get_device(session, stack.device_codes[0]).hotel_id
        operator = ensure_operator(session, "op", "Test Operator")
        hotel_b = create_hotel(session, operator, "other", "Other Hotel", rooms=2)
        (device_b,) = place_devices(session, hotel_b, 1, code_prefix="OTH")
        now = stack.runtime.clock.now()
        usernames: dict[str, str] = {}
        for role, hotel in (
            (Role.ADMIN, None),
            (Role.MANAGER, hotel_a),
            (Role.FRONT_DESK, hotel_a),
            (Role.TECHNICIAN, hotel_a),
        ):
            usernames[role.value] = f"{role.value}-a"
            create_user(session, usernames[role.value], PASSWORD, role, hotel, now)
    device_a = stack.device_codes[0]
    with device_agents(stack, [device_a, device_b]), stack.client() as http:
        orders = [
            http.post(
                "/api/v1/checkout", json={"device": d, "program": "dry30", "wallet": "wechat"}
            ).json()["order_id"]
            for d in (device_a, device_b)
        ]
        cookies: dict[str, dict[str, str]] = {"anonymous": {}}
        for role_name, username in usernames.items():
            token = http.post(
                "/api/v1/auth/token", data={"username": username, "password": PASSWORD}
            ).json()["access_token"]
            cookies[role_name] = {"roompay_token": token}
    with stack.runtime.ctx.sessions() as session:
        hotel_code = session.get_one(Hotel, hotel_a).code
    return World(
        stack, device_a, orders[0], orders[1], cookies, usernames, hotel_code, "other", device_b
    )


def _call(
    world: World, role: str, method: str, path: str, order_id: str, *, other_hotel: bool = False
) -> int:
    url = path.format(
        code=world.device_b if other_hotel else world.device_a,
        order_id=order_id,
        hotel=world.hotel_b if other_hotel else world.hotel_a,
        period="2026-01-01",
        bill_date="2026-01-01",
        program="dry30",
    )
    cookie = world.cookies[role]
    headers = {"Authorization": f"Bearer {cookie['roompay_token']}"} if cookie else {}
    kwargs: dict[str, object] = {}
    if (method, path) == ("POST", "/api/v1/auth/token") or (method, path) == ("POST", "/login"):
        username = world.usernames.get(role, "nobody")
        kwargs["data"] = {"username": username, "password": PASSWORD}
    elif path == "/api/v1/orders/{order_id}/refunds" and method == "POST":
        kwargs["json"] = {"amount_fen": 100, "reason": "authorization walk"}
    elif path == "/dashboard/orders/{order_id}/refund":
        kwargs["data"] = {"amount": "1.00", "reason": "walk", "key": "k1", "csrf": "forged"}
    elif path in FORM_BODIES and method == "POST":
        kwargs["data"] = FORM_BODIES[path]
    elif path in JSON_BODIES and method in ("PUT", "PATCH", "POST"):
        kwargs["json"] = JSON_BODIES[path]
    elif method == "POST":
        kwargs["content"] = b"{}"
        headers["Content-Type"] = "application/json"
    with httpx.Client(
        base_url=world.stack.base_url, cookies=cookie, timeout=10, follow_redirects=False
    ) as http:
        if path == "/api/v1/feed":
            with http.stream(method, url, headers=headers) as response:
                return response.status_code
        return http.request(method, url, headers=headers, **kwargs).status_code  # type: ignore[arg-type]


def test_every_route_is_in_the_table(stack: Stack) -> None:
    assert _app_routes(stack) == set(EXPECTED)


def test_every_route_answers_each_role_as_the_table_says(world: World) -> None:
    actual = {
        route: tuple(_call(world, role, *route, world.order_a) for role in ROLES)
        for route in EXPECTED
    }
    assert actual == EXPECTED


def test_hotel_a_staff_are_told_hotel_b_orders_do_not_exist(world: World) -> None:
    actual = {
        route: tuple(_call(world, role, *route, world.order_b) for role in ROLES[1:])
        for route in OBJECT_LEVEL
    }
    assert actual == OBJECT_LEVEL
    # And the same for hotel B itself and its appliances (one world: it is slow to build)
    actual = {
        route: tuple(
            _call(world, role, *route, world.order_b, other_hotel=True) for role in ROLES[1:]
        )
        for route in HOTEL_LEVEL
    }
    assert actual == HOTEL_LEVEL

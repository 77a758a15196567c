"""Programs and prices per hotel: managers change them, audited; orders keep their price."""

from sqlalchemy import select, update

from roompay.services.auth import Role, create_user
from roompay.services.catalog import get_device
from roompay.services.seed import create_hotel, ensure_operator
from roompay.store.db import transaction
from roompay.store.models import AuditEntry, Device, Hotel, Order
from tests.support.server import Stack

PASSWORD = "correct horse"


def _bearer(stack: Stack, username: str, role: Role, hotel_id: int | None) -> dict[str, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, PASSWORD, role, hotel_id, stack.runtime.clock.now())
    with stack.client() as http:
        token = http.post(
            "/api/v1/auth/token", data={"username": username, "password": PASSWORD}
        ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _hotel(stack: Stack) -> tuple[int, str]:
    with stack.runtime.ctx.sessions() as session:
        hotel_id = get_device(session, stack.device_codes[0]).hotel_id
        return hotel_id, session.get_one(Hotel, hotel_id).code


def test_a_manager_changes_a_price_and_only_new_orders_pay_it(quiet_stack: Stack) -> None:
    stack = quiet_stack
    hotel_id, hotel = _hotel(stack)
    manager = _bearer(stack, "manager-a", Role.MANAGER, hotel_id)
    with transaction(stack.runtime.ctx.sessions) as session:
        session.execute(update(Device).values(online=True))
    device = stack.device_codes[0]  # a clothes dryer
    checkout = {"device": device, "program": "dry30", "wallet": "wechat"}
    with stack.client() as http:
        # Given an order created at the old price
        before = http.post("/api/v1/checkout", json=checkout).json()
        # When the manager raises the price of dry30 from 8.00 to 9.50
        changed = http.patch(
            f"/api/v1/hotels/{hotel}/programs/dry30", json={"amount_fen": 950}, headers=manager
        )
        after = http.post("/api/v1/checkout", json=checkout).json()
        programs = http.get(f"/api/v1/devices/{device}/programs").json()
        listed = http.get(f"/api/v1/hotels/{hotel}/programs", headers=manager).json()
    # Then new orders pay 9.50 and the earlier one keeps 8.00
    assert changed.status_code == 200, changed.text
    assert changed.json() == {
        "hotel": hotel,
        "code": "dry30",
        "kind": "clothes_dryer",
        "name": "Dry 30 min",
        "duration_s": 1800,
        "amount_fen": 950,
        "active": True,
    }
    assert (before["amount_fen"], after["amount_fen"]) == (800, 950)
    with stack.runtime.ctx.sessions() as session:
        assert session.get_one(Order, before["order_id"]).amount_fen == 800
        (entry,) = session.scalars(select(AuditEntry)).all()
    assert [(p["code"], p["amount_fen"]) for p in programs] == [("dry30", 950), ("dry60", 1500)]
    assert len(listed) == 8
    assert (entry.action, entry.target, entry.detail) == (
        "program_changed",
        f"{hotel}/dry30",
        {"by": "manager-a", "old": {"amount_fen": 800}, "new": {"amount_fen": 950}},
    )


def test_a_disabled_program_is_not_sold_and_bad_prices_are_refused(quiet_stack: Stack) -> None:
    stack = quiet_stack
    hotel_id, hotel = _hotel(stack)
    admin = _bearer(stack, "operator", Role.ADMIN, None)
    desk = _bearer(stack, "desk-a", Role.FRONT_DESK, hotel_id)
    with transaction(stack.runtime.ctx.sessions) as session:
        other = create_hotel(session, ensure_operator(session, "op", "Op"), "other", "B", rooms=1)
        other_id = other.id
    other_manager = _bearer(stack, "manager-b", Role.MANAGER, other_id)
    device = stack.device_codes[0]
    url = f"/api/v1/hotels/{hotel}/programs/dry60"
    with stack.client() as http:
        # Prices must be whole fen from 1 to 500 yuan; other hotels and the front desk are refused
        before = stack.table_counts()
        answers = [
            http.patch(url, json=body, headers=auth)
            for body, auth in (
                ({"amount_fen": 0}, admin),
                ({"amount_fen": 50_001}, admin),
                ({"amount_fen": 9.5}, admin),
                ({"amount_fen": "950"}, admin),
                ({"price": 950}, admin),
                ({"amount_fen": 950}, desk),
                ({"amount_fen": 950}, other_manager),
            )
        ]
        assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == [
            (422, "invalid_price"),
            (422, "invalid_price"),
            (422, "invalid_request"),
            (422, "invalid_request"),
            (422, "invalid_request"),
            (403, "forbidden"),
            (404, "unknown_hotel"),
        ]
        assert stack.table_counts() == before
        # When the operator switches dry60 off at this hotel
        off = http.patch(url, json={"active": False}, headers=admin)
        sold = [p["code"] for p in http.get(f"/api/v1/devices/{device}/programs").json()]
        refused = http.post(
            "/api/v1/checkout", json={"device": device, "program": "dry60", "wallet": "alipay"}
        )
    # Then guests no longer see or buy it, and the change is audited
    assert (off.status_code, off.json()["active"]) == (200, False)
    assert sold == ["dry30"]
    assert (refused.status_code, refused.json()["error"]["code"]) == (404, "unknown_program")
    with stack.runtime.ctx.sessions() as session:
        (entry,) = session.scalars(select(AuditEntry)).all()
    assert (entry.action, entry.hotel_id, entry.detail) == (
        "program_changed",
        hotel_id,
        {"by": "operator", "old": {"active": True}, "new": {"active": False}},
    )

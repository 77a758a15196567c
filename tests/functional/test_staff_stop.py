"""Staff stop a running appliance: a signed stop through the outbox, then a pro-rated refund."""

import time
from typing import Any

import httpx
from sqlalchemy import select

from roompay.services.auth import Role, create_user
from roompay.services.seed import create_hotel, ensure_operator
from roompay.store.db import transaction
from roompay.store.models import AuditEntry, Command, Device, Order, Refund
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for

# Device seconds per wall second: the 30-minute program runs 90 s, long enough to stop it.
TIME_SCALE = 20.0


def _login(stack: Stack, username: str, role: Role, hotel_id: int | None) -> dict[str, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, "pw-" + username, role, hotel_id, stack.clock.now())
    with stack.client() as http:
        token = http.post(
            "/api/v1/auth/token", data={"username": username, "password": "pw-" + username}
        ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _hotel_id(stack: Stack) -> int:
    with stack.runtime.ctx.sessions() as session:
        return session.scalars(
            select(Device.hotel_id).where(Device.code == stack.device_codes[0])
        ).one()


def _other_hotel(stack: Stack) -> int:
    with transaction(stack.runtime.ctx.sessions) as session:
        operator = ensure_operator(session, "op", "Test Operator")
        return create_hotel(session, operator, "other", "Other Hotel", rooms=1).id


def _order(http: httpx.Client, order_id: str) -> dict[str, Any]:
    body: dict[str, Any] = http.get(f"/api/v1/orders/{order_id}").json()
    return body


def test_front_desk_stops_a_run_and_the_guest_gets_the_unused_share_back(stack: Stack) -> None:
    device = stack.device_codes[0]
    front_desk = _login(stack, "desk", Role.FRONT_DESK, _hotel_id(stack))
    with device_agents(stack, [device], time_scale=TIME_SCALE), stack.client() as http:
        # Given a guest's 30-minute, 8-yuan run that has gone on for over a minute
        order = http.post(
            "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": "wechat"}
        ).json()
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        wait_for(lambda: _order(http, order["order_id"])["status"] == "running", 20, "running")
        time.sleep(80 / TIME_SCALE)
        # When the front desk stops it, with a reason
        stop = http.post(
            f"/api/v1/devices/{device}/stop",
            json={"reason": "guest asked to stop"},
            headers=front_desk,
        )
        assert stop.status_code == 202, stop.text
        # Then the appliance ends the run as a remote stop and the unused share goes back
        ended = wait_for(
            lambda: (o := _order(http, order["order_id"]))["status"] == "partially_refunded" and o,
            30,
            "partially refunded",
        )
        assert http.post(
            f"/api/v1/devices/{device}/stop", json={"reason": "again"}, headers=front_desk
        ).json() == {
            "error": {
                "code": "device_not_running",
                "message": "the appliance is not running; there is nothing to stop",
            }
        }
    body = stop.json()
    assert (body["device"], body["order_id"], body["status"]) == (
        device,
        order["order_id"],
        "pending",
    )
    with stack.runtime.ctx.sessions() as session:
        stored = session.get_one(Order, order["order_id"])
        actual = stored.actual_run_s
        assert actual is not None
        # The stop came after 80 device seconds, well before the 1800 paid for
        assert 80 <= actual < 1800
        assert stored.end_reason == "remote_stop"
        # The policy: the unused share of 800 fen, rounded up to the fen for the guest
        expected = -(-800 * (1800 - actual) // 1800)
        refund = session.scalars(select(Refund).where(Refund.order_id == stored.id)).one()
        assert (refund.amount_fen, refund.reason, refund.status) == (
            expected,
            "early_stop:remote_stop",
            "refunded",
        )
        assert ended["refunded_fen"] == expected
        command = session.get_one(Command, body["command_id"])
        assert (command.kind, command.status, command.answer) == ("stop", "accepted", "accepted")
        assert command.payload["run_id"] == body["run_id"]
        (entry,) = session.scalars(select(AuditEntry).where(AuditEntry.action == "stop"))
        assert (entry.target, entry.detail["reason"], entry.detail["by"]) == (
            device,
            "guest asked to stop",
            "desk",
        )
        assert entry.detail["order_id"] == order["order_id"]


def test_stops_that_cannot_be_done_are_refused_and_change_nothing(stack: Stack) -> None:
    device = stack.device_codes[0]
    url = f"/api/v1/devices/{device}/stop"
    staff_a = _login(stack, "tech-a", Role.TECHNICIAN, _hotel_id(stack))
    other = _other_hotel(stack)
    staff_b = {
        role: _login(stack, f"{role.value}-b", role, other)
        for role in (Role.MANAGER, Role.FRONT_DESK, Role.TECHNICIAN)
    }
    before = stack.table_counts()
    with stack.client() as http:
        # An idle appliance has nothing to stop
        idle = http.post(url, json={"reason": "test"}, headers=staff_a)
        # Another hotel's staff are told the appliance does not exist
        foreign = {
            role: http.post(url, json={"reason": "test"}, headers=headers)
            for role, headers in staff_b.items()
        }
        unknown = http.post("/api/v1/devices/NO-SUCH/stop", json={"reason": "x"}, headers=staff_a)
        # Bad input and no login are refused before anything is looked up
        anonymous = http.post(url, json={"reason": "test"})
        bad = [
            http.post(url, json={}, headers=staff_a),
            http.post(url, json={"reason": ""}, headers=staff_a),
            http.post(url, json={"reason": "x" * 201}, headers=staff_a),
            http.post(url, json={"reason": "x", "order_id": "y"}, headers=staff_a),
            http.post(url, content=b"{", headers=staff_a | {"Content-Type": "application/json"}),
        ]
    assert (idle.status_code, idle.json()["error"]["code"]) == (409, "device_not_running")
    answers = {role: (r.status_code, r.json()["error"]["code"]) for role, r in foreign.items()}
    assert answers == dict.fromkeys(staff_b, (404, "unknown_device"))
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_device")
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "invalid_token")
    assert [(r.status_code, r.json()["error"]["code"]) for r in bad] == [
        (422, "invalid_request"),
        (422, "invalid_request"),
        (422, "invalid_request"),
        (422, "invalid_request"),
        (400, "malformed_json"),
    ]
    assert stack.table_counts() == before

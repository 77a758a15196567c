"""Comp sessions: hotel staff start a free run, with a reason, through the signed command path."""

import httpx
from sqlalchemy import select, update

from roompay.services.auth import Role, create_user
from roompay.services.catalog import get_device
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import transaction
from roompay.store.models import (
    AuditEntry,
    Command,
    Device,
    LedgerEntry,
    Order,
    OrderEvent,
    PaymentNotice,
    Refund,
)
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for

PASSWORD = "correct horse"


def _bearer(stack: Stack, username: str, role: Role, hotel_id: int | None) -> dict[str, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, PASSWORD, role, hotel_id, stack.runtime.clock.now())
    with stack.client() as http:
        token = http.post(
            "/api/v1/auth/token", data={"username": username, "password": PASSWORD}
        ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _hotel_id(stack: Stack) -> int:
    with stack.runtime.ctx.sessions() as session:
        return get_device(session, stack.device_codes[0]).hotel_id


def _events(stack: Stack, order_id: str) -> list[str]:
    with stack.runtime.ctx.sessions() as session:
        return list(
            session.scalars(
                select(OrderEvent.event)
                .where(OrderEvent.order_id == order_id)
                .order_by(OrderEvent.id)
            )
        )


def test_the_front_desk_comps_a_run_that_starts_and_moves_no_money(stack: Stack) -> None:
    # Given the front desk of the hotel and an idle appliance
    auth = _bearer(stack, "desk-a", Role.FRONT_DESK, _hotel_id(stack))
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        # When they start a free run of a program because a guest complained
        answer = http.post(
            f"/api/v1/devices/{device}/comps",
            json={"program": "dry30", "reason": "dryer broke mid-run yesterday"},
            headers=auth | {"Idempotency-Key": "complaint-1"},
        )
        assert answer.status_code == 201, answer.text
        comp = answer.json()
        order_id = comp["order_id"]
        # Then the appliance runs it to its end, like a paid order
        wait_for(lambda: "ended" in _events(stack, order_id), 15, "the comp to end")
        # And the same request again returns the same comp, starting nothing new
        again = http.post(
            f"/api/v1/devices/{device}/comps",
            json={"program": "dry30", "reason": "dryer broke mid-run yesterday"},
            headers=auth | {"Idempotency-Key": "complaint-1"},
        )
        order = http.get(f"/api/v1/orders/{order_id}").json()
    assert (again.status_code, again.json()["order_id"]) == (200, order_id)
    assert {k: comp[k] for k in ("device", "program", "duration_s", "amount_fen", "status")} == {
        "device": device,
        "program": "dry30",
        "duration_s": 1800,
        "amount_fen": 0,
        "status": "paid",
    }
    assert _events(stack, order_id) == [
        "comped",
        "command_queued",
        "command_sent",
        "command_accepted",
        "started",
        "ended",
    ]
    assert (order["wallet"], order["amount_fen"], order["refunded_fen"]) == ("comp", 0, 0)
    assert order["status"] == "completed"
    assert order["paid_at"] is None
    with stack.runtime.ctx.sessions() as session:
        # No provider, no ledger money, no refund; one audit entry with the reason
        assert session.scalars(select(PaymentNotice)).all() == []
        assert (
            session.scalars(select(LedgerEntry).where(LedgerEntry.order_id == order_id)).all() == []
        )
        assert session.scalars(select(Refund)).all() == []
        (entry,) = session.scalars(select(AuditEntry)).all()
        assert (entry.action, entry.target, entry.detail) == (
            "comp",
            order_id,
            {
                "by": "desk-a",
                "device": device,
                "program": "dry30",
                "duration_s": 1800,
                "reason": "dryer broke mid-run yesterday",
            },
        )
        (command,) = session.scalars(select(Command).where(Command.order_id == order_id)).all()
        assert command.kind == "start"


def test_a_comp_is_refused_on_another_hotel_a_busy_appliance_and_without_a_reason(
    quiet_stack: Stack,
) -> None:
    stack = quiet_stack
    ctx = stack.runtime.ctx
    with transaction(ctx.sessions) as session:
        session.execute(update(Device).values(online=True))
        other = create_hotel(session, ensure_operator(session, "op", "Op"), "other", "B", rooms=1)
        (their_device,) = place_devices(session, other, 1, code_prefix="OTH")
        session.execute(update(Device).values(online=True))
    desk = _bearer(stack, "desk-a", Role.FRONT_DESK, _hotel_id(stack))
    technician = _bearer(stack, "tech-a", Role.TECHNICIAN, _hotel_id(stack))
    ours = stack.device_codes[0]
    body = {"program": "dry30", "reason": "complaint"}
    before = stack.table_counts()
    with stack.client() as http:

        def refused(device: str, json: object, auth: dict[str, str]) -> tuple[int, str]:
            answer: httpx.Response = http.post(
                f"/api/v1/devices/{device}/comps", json=json, headers=auth
            )
            return answer.status_code, answer.json()["error"]["code"]

        # Hotel A's front desk on hotel B's appliance: it does not exist for them
        assert refused(their_device, body, desk) == (404, "unknown_device")
        # A technician may not comp; a reason is required; the program must be sold there
        assert refused(ours, body, technician) == (403, "forbidden")
        assert refused(ours, {"program": "dry30", "reason": "   "}, desk) == (422, "invalid_reason")
        assert refused(ours, {"program": "air8h", "reason": "x"}, desk) == (404, "unknown_program")
        assert stack.table_counts() == before
        # Given one comp already waiting to start, a second one on the same appliance is busy
        first = http.post(f"/api/v1/devices/{ours}/comps", json=body, headers=desk)
        assert first.status_code == 201
        assert refused(ours, body, desk) == (409, "device_busy")
        # And a guest checkout is no way round it: the device is not idle for the comp either
    with ctx.sessions() as session:
        orders = session.scalars(select(Order)).all()
    assert [(o.wallet, o.amount_fen, o.status) for o in orders] == [("comp", 0, "paid")]

"""The live consumption feed: server-sent events of every order step, per hotel."""

from collections.abc import Iterator
from typing import Any

import httpx

from roompay.services.auth import Role, create_user
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import transaction
from roompay.store.models import OrderEvent
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.timeline import PAID_RUN_STEPS

PASSWORD = "correct horse"


def _other_hotel(stack: Stack) -> tuple[int, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        operator = ensure_operator(session, "op", "Test Operator")
        other = create_hotel(session, operator, "other", "Other Hotel", rooms=2)
        (code,) = place_devices(session, other, 1, code_prefix="OTH")
        return other.id, code


def _hotel_id(stack: Stack) -> int:
    with stack.runtime.ctx.sessions() as session:
        from roompay.services.catalog import get_device  # noqa: PLC0415 - test-local helper

        return get_device(session, stack.device_codes[0]).hotel_id


def _bearer(stack: Stack, username: str, role: Role, hotel_id: int | None) -> dict[str, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, PASSWORD, role, hotel_id, stack.runtime.clock.now())
    with stack.client() as http:
        token = http.post(
            "/api/v1/auth/token", data={"username": username, "password": PASSWORD}
        ).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def _frames(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse server-sent events: yield each `order` event's id and data."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields.get("event") == "order":
                yield {
                    "id": int(fields["id"]),
                    **httpx.Response(200, content=fields["data"]).json(),
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def _buy(http: httpx.Client, device: str, program: str) -> str:
    created = http.post(
        "/api/v1/checkout", json={"device": device, "program": program, "wallet": "wechat"}
    )
    assert created.status_code == 201, created.text
    paid = http.post("/sandbox/pay", json={"qr": created.json()["qr"]})
    assert paid.status_code == 200, paid.text
    return str(created.json()["order_id"])


def test_a_hotels_subscriber_gets_every_step_and_another_hotels_gets_none(stack: Stack) -> None:
    # Given a subscriber in each of two hotels, connected before anything happens
    other_id, other_device = _other_hotel(stack)
    ours = _bearer(stack, "desk-a", Role.FRONT_DESK, _hotel_id(stack))
    theirs = _bearer(stack, "desk-b", Role.FRONT_DESK, other_id)
    device = stack.device_codes[0]
    timeout = httpx.Timeout(10, read=15)
    with (
        httpx.Client(base_url=stack.base_url, timeout=timeout) as feed_http,
        feed_http.stream("GET", "/api/v1/feed", headers=ours) as our_feed,
        feed_http.stream("GET", "/api/v1/feed", headers=theirs) as their_feed,
        device_agents(stack, [device, other_device]),
        stack.client() as http,
    ):
        assert our_feed.status_code == 200
        assert our_feed.headers["content-type"].startswith("text/event-stream")
        assert their_feed.status_code == 200
        # When a guest of our hotel buys a program and it runs to its end
        order_id = _buy(http, device, "dry30")
        ours_seen = []
        for item in _frames(our_feed):
            ours_seen.append(item)
            if item["event"] == "ended":
                break
        # And then a guest of the other hotel opens a checkout
        other_order = http.post(
            "/api/v1/checkout",
            json={"device": other_device, "program": "dry30", "wallet": "alipay"},
        ).json()["order_id"]
        their_first = next(_frames(their_feed))
    # Then our subscriber saw each step of the order, once, in order, with where and how much
    assert [item["event"] for item in ours_seen] == PAID_RUN_STEPS
    assert {item["order_id"] for item in ours_seen} == {order_id}
    with stack.runtime.ctx.sessions() as session:
        ids = [e.id for e in session.query(OrderEvent).filter_by(order_id=order_id).order_by("id")]
    assert [item["id"] for item in ours_seen] == ids
    first = ours_seen[0]
    assert {k: first[k] for k in ("device", "room", "kind", "program", "wallet", "amount_fen")} == {
        "device": device,
        "room": "101",
        "kind": "clothes_dryer",
        "program": "dry30",
        "wallet": "wechat",
        "amount_fen": 800,
    }
    assert first["detail"] == {"wallet": "wechat", "amount_fen": 800}
    # And the other hotel's subscriber saw none of it: its first event is its own hotel's
    assert (their_first["order_id"], their_first["event"]) == (other_order, "created")
    assert their_first["hotel"] == "other"


def test_a_subscriber_resumes_after_the_last_event_it_saw(stack: Stack) -> None:
    # Given an order that has run to its end
    headers = _bearer(stack, "manager-a", Role.MANAGER, _hotel_id(stack))
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order_id = _buy(http, device, "dry30")
        with http.stream("GET", "/api/v1/feed?after=0", headers=headers) as everything:
            steps = []
            for item in _frames(everything):
                steps.append(item)
                if item["event"] == "ended":
                    break
        # When a subscriber comes back saying it saw the third step
        with http.stream(
            "GET", "/api/v1/feed", headers={**headers, "Last-Event-ID": str(steps[2]["id"])}
        ) as resumed:
            rest = []
            for item in _frames(resumed):
                rest.append(item)
                if item["event"] == "ended":
                    break
    # Then it gets the steps after it, and only those
    assert [s["event"] for s in steps] == PAID_RUN_STEPS
    assert {s["order_id"] for s in steps} == {order_id}
    assert [item["id"] for item in rest] == [s["id"] for s in steps[3:]]


def test_a_step_committed_after_a_later_one_still_reaches_the_subscriber(stack: Stack) -> None:
    # Given a subscriber following an order's steps
    headers = _bearer(stack, "manager-a", Role.MANAGER, _hotel_id(stack))
    device = stack.device_codes[0]
    with device_agents(stack, [device]), stack.client() as http:
        order_id = _buy(http, device, "dry30")
        with http.stream("GET", "/api/v1/feed?after=0", headers=headers) as live:
            frames = _frames(live)
            last = next(item for item in frames if item["event"] == "ended")["id"]
            # When two transactions commit out of id order: id last+10 first, then last+5
            now = stack.runtime.clock.now()
            for event_id, event in ((last + 10, "later_id"), (last + 5, "earlier_id")):
                with transaction(stack.runtime.ctx.sessions) as session:
                    session.add(
                        OrderEvent(id=event_id, order_id=order_id, at=now, event=event, detail={})
                    )
                if event == "later_id":
                    assert next(frames)["event"] == "later_id"
            late = next(frames)
    # Then the step with the earlier id is sent too, once it is committed
    assert (late["id"], late["event"]) == (last + 5, "earlier_id")


def test_the_feed_refuses_the_anonymous_and_technicians(stack: Stack) -> None:
    technician = _bearer(stack, "tech-a", Role.TECHNICIAN, _hotel_id(stack))
    with stack.client() as http:
        anonymous = http.get("/api/v1/feed")
        refused = http.get("/api/v1/feed", headers=technician)
        bad_resume = http.get("/api/v1/feed", headers={**technician, "Last-Event-ID": "x"})
    assert (anonymous.status_code, anonymous.json()["error"]["code"]) == (401, "invalid_token")
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
    assert bad_resume.status_code == 403

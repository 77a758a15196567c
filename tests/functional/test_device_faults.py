"""Faults an appliance reports: the server marks the device, refuses checkout, refunds the run.

The reports come through the real broker and the server's real parsers: the agent's
own fault (a run ended as `fault`) and `evt/fault` payloads as a device sends them.
"""

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import paho.mqtt.publish as mqtt_publish
from sqlalchemy import select

from roompay.protocol import EventName, parse_mqtt_url
from roompay.protocol.messages import FaultEvent, encode
from roompay.store.models import AuditEntry, Device, Order, Refund
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for

TIME_SCALE = 20.0  # the 30-minute program runs 90 s: long enough to fault it mid-run
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


def _publish_fault_topic(stack: Stack, code: str, payload: bytes) -> None:
    """Publish on the device's `evt/fault` as the device would (QoS 1, PUBACK awaited)."""
    endpoint = parse_mqtt_url(stack.mqtt_url)
    auth = (
        None
        if endpoint.username is None
        else {"username": endpoint.username, "password": endpoint.password}
    )
    mqtt_publish.single(
        stack.runtime.topics.event(code, EventName.FAULT),
        payload,
        qos=1,
        hostname=endpoint.host,
        port=endpoint.port,
        auth=auth,  # type: ignore[arg-type]
    )


def _report(stack: Stack, code: str, fault: str, active: bool, at: datetime) -> None:
    _publish_fault_topic(stack, code, encode(FaultEvent(fault=fault, active=active, ts=at)))


def _state(stack: Stack, code: str) -> str:
    with stack.runtime.ctx.sessions() as session:
        return session.scalars(select(Device.state).where(Device.code == code)).one()


def _fault_log(stack: Stack, code: str) -> list[tuple[str, str, str]]:
    with stack.runtime.ctx.sessions() as session:
        entries = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.target == code, AuditEntry.action.like("device_fault%"))
            .order_by(AuditEntry.id)
        )
        return [(e.action, e.detail["fault"], e.detail["reported_at"]) for e in entries]


def _checkout(http: httpx.Client, code: str) -> httpx.Response:
    return http.post(
        "/api/v1/checkout", json={"device": code, "program": "dry30", "wallet": "alipay"}
    )


def _order(http: httpx.Client, order_id: str) -> dict[str, Any]:
    body: dict[str, Any] = http.get(f"/api/v1/orders/{order_id}").json()
    return body


def test_a_fault_mid_run_ends_it_with_the_pro_rated_refund_and_blocks_checkout(
    stack: Stack,
) -> None:
    code = stack.device_codes[0]
    with device_agents(stack, [code], time_scale=TIME_SCALE) as (agent,), stack.client() as http:
        # Given a guest's 30-minute, 8-yuan run that has gone on for over a minute
        order = _checkout(http, code).json()
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        wait_for(lambda: _order(http, order["order_id"])["status"] == "running", 20, "running")
        time.sleep(80 / TIME_SCALE)
        # When the appliance faults
        agent.fault("heater_overtemp")
        # Then the run ends as `fault`, the unused share goes back, and the device is faulted
        done = wait_for(
            lambda: (o := _order(http, order["order_id"]))["status"] == "partially_refunded" and o,
            30,
            "partially refunded",
        )
        assert _state(stack, code) == "fault"
        before = stack.table_counts()
        refused = _checkout(http, code)
        assert stack.table_counts() == before
        # And once repaired, the appliance takes orders again
        agent.clear_fault()
        wait_for(lambda: _state(stack, code) == "idle", 10, "fault cleared")
        assert _checkout(http, code).status_code == 201
    assert refused.status_code == 409
    assert refused.json() == {
        "error": {
            "code": "device_faulted",
            "message": "the appliance reports a fault; please contact the front desk",
        }
    }
    with stack.runtime.ctx.sessions() as session:
        stored = session.get_one(Order, order["order_id"])
        actual = stored.actual_run_s
        assert actual is not None
        assert 80 <= actual < 1800
        assert stored.end_reason == "fault"
        expected = -(-800 * (1800 - actual) // 1800)  # the unused share, rounded up
        refund = session.scalars(select(Refund).where(Refund.order_id == stored.id)).one()
        assert (refund.amount_fen, refund.reason) == (expected, "early_stop:fault")
    assert done["refunded_fen"] == expected
    # The fault is kept with the appliance's own code, then its repair
    assert [(action, fault) for action, fault, _at in _fault_log(stack, code)] == [
        ("device_fault", "heater_overtemp"),
        ("device_fault_cleared", "heater_overtemp"),
    ]


def test_fault_reports_raise_and_clear_in_order_and_bad_ones_change_nothing(stack: Stack) -> None:
    code = stack.device_codes[0]
    with device_agents(stack, [code]), stack.client() as http:
        # When the idle device reports a fault
        _report(stack, code, "heater_overtemp", True, T0)
        wait_for(lambda: _state(stack, code) == "fault", 10, "faulted")
        # Then checkout is refused with the contract's error
        assert _checkout(http, code).json()["error"]["code"] == "device_faulted"
        # And neither bad payloads nor reports older than the last change anything
        for bad in (
            b"not json",
            b'{"fault":"heater_overtemp","active":false}',
            b'{"fault":"heater_overtemp","active":false,"ts":"2026-03-01T09:00:00"}',
            b'{"fault":"heater_overtemp","active":false,"ts":"2026-03-01T09:00:00Z","x":1}',
            b'{"fault":"no spaces","active":false,"ts":"2026-03-01T09:00:00Z"}',
        ):
            _publish_fault_topic(stack, code, bad)
        _report(stack, code, "heater_overtemp", False, T0 - timedelta(seconds=1))
        _report(stack, code, "heater_overtemp", True, T0)  # the same report again
        # When the device reports it cleared (messages on one topic arrive in order)
        _report(stack, code, "heater_overtemp", False, T0 + timedelta(minutes=5))
        wait_for(lambda: _state(stack, code) == "idle", 10, "cleared")
        # Then a raise older than the clear is ignored, a newer one applies
        _report(stack, code, "door_sensor", True, T0 + timedelta(minutes=4))
        _report(stack, code, "door_sensor", True, T0 + timedelta(minutes=6))
        wait_for(lambda: _state(stack, code) == "fault", 10, "faulted again")
        _report(stack, code, "door_sensor", False, T0 + timedelta(minutes=7))
        wait_for(lambda: _state(stack, code) == "idle", 10, "cleared again")
        # And the appliance takes orders again
        assert _checkout(http, code).status_code == 201
    assert _fault_log(stack, code) == [
        ("device_fault", "heater_overtemp", "2026-03-01T08:00:00+00:00"),
        ("device_fault_cleared", "heater_overtemp", "2026-03-01T08:05:00+00:00"),
        ("device_fault", "door_sensor", "2026-03-01T08:06:00+00:00"),
        ("device_fault_cleared", "door_sensor", "2026-03-01T08:07:00+00:00"),
    ]

"""The embedded broker as the runtime configures it: closed to anonymous clients.

With `ROOMPAY_MQTT_URL=embedded` (the demo's default) the runtime gives the broker every
provisioned device's account and its own, so only provisioned appliances get in, and a
device provisioned while the server runs is let in without a restart.
"""

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from roompay.device.agent import DeviceAgent
from roompay.device.relay import SimulatedRelay
from roompay.iot.credentials import BACKEND_USERNAME
from roompay.protocol.signing import device_key
from roompay.services.provisioning import rotate_password
from roompay.store.db import transaction
from tests.functional.test_broker_security import NOT_AUTHORIZED, Probe
from tests.support.devices import device_online
from tests.support.server import Stack, running_stack
from tests.support.waiting import wait_for


@pytest.fixture
def embedded_stack(tmp_path: Path, keys_dir: Path, sqlite_template: Path) -> Iterator[Stack]:
    """A server on SQLite whose runtime starts and configures its own embedded broker."""
    db = tmp_path / "roompay.db"
    db.write_bytes(sqlite_template.read_bytes())
    with running_stack(tmp_path, keys_dir, f"sqlite:///{db}", "embedded") as stack:
        yield stack


def _connack(stack: Stack, username: str | None, password: str | None) -> str:
    """Connect once and hang up at once: a device's client id must not stay taken."""
    probe = Probe(stack.runtime.mqtt_endpoint().port, username, password)
    try:
        return probe.connect()
    finally:
        probe.close()


def test_the_runtimes_embedded_broker_refuses_anonymous_and_lets_provisioned_devices_run(
    embedded_stack: Stack,
) -> None:
    stack = embedded_stack
    code = stack.device_codes[0]
    # Given the server runs on its own embedded broker, and the device has no account yet
    broker = stack.runtime.mqtt_endpoint()
    assert broker.host == "127.0.0.1"
    assert broker.username == BACKEND_USERNAME
    # Then anonymous clients, unknown users and devices without an account are refused
    assert _connack(stack, None, None) == NOT_AUTHORIZED
    assert _connack(stack, code, "not-provisioned") == NOT_AUTHORIZED
    assert _connack(stack, BACKEND_USERNAME, "guessed") == NOT_AUTHORIZED

    # When the device is provisioned while the server runs (as `roompay device add` does)
    with transaction(stack.runtime.ctx.sessions) as session:
        creds = rotate_password(session, code, stack.runtime.clock.now())
    # Then the broker lets it in within the refresh interval, with that password only
    wait_for(
        lambda: _connack(stack, code, creds.mqtt_password) == "Success",
        10,
        "the new account picked up",
    )
    assert _connack(stack, code, "wrong") == NOT_AUTHORIZED

    # And the appliance, logged in with its account, gets its start command and runs
    agent = DeviceAgent(
        code,
        replace(broker, username=code, password=creds.mqtt_password),
        stack.runtime.topics,
        SimulatedRelay(),
        device_key=device_key(stack.settings.secret_key.encode(), code, "k1"),
        time_scale=1000.0,
        progress_every_s=600,
    )
    agent.start()
    try:
        wait_for(lambda: device_online(stack, code), 15, "device online")
        with httpx.Client(base_url=stack.base_url, timeout=10) as http:
            order = http.post(
                "/api/v1/checkout", json={"device": code, "program": "dry30", "wallet": "wechat"}
            ).json()
            assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
            wait_for(
                lambda: (
                    http.get(f"/api/v1/orders/{order['order_id']}").json()["status"] == "completed"
                ),
                20,
                "order completed",
            )
    finally:
        agent.stop()

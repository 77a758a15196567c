"""The device link end to end: server link -> real broker -> device agent -> relay.

Every test runs against the embedded broker and against Mosquitto, each under its
own topic root so that runs sharing one Mosquitto never see each other.
"""

import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from roompay.device.agent import DeviceAgent
from roompay.device.relay import SimulatedRelay
from roompay.iot.broker import EmbeddedBroker, EmbeddedBrokerError
from roompay.iot.link import MqttLink
from roompay.protocol import (
    CommandName,
    ConnectError,
    EventName,
    MqttEndpoint,
    ParsedTopic,
    TopicKind,
    Topics,
    parse_mqtt_url,
)
from roompay.protocol.messages import (
    AckStatus,
    CommandAck,
    DevicePresence,
    EndReason,
    Heartbeat,
    RunEvent,
    RunEventKind,
    StartCommand,
    StateMessage,
    decode,
)

MOSQUITTO_URL = os.environ.get("ROOMPAY_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
WAIT_S = 10.0
# A fresh interpreter importing pydantic and paho takes seconds on a loaded machine.
SPAWN_WAIT_S = 30.0
T = TypeVar("T")


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(params=["embedded", pytest.param("mosquitto", marks=pytest.mark.services)])
def endpoint(request: pytest.FixtureRequest) -> Iterator[MqttEndpoint]:
    if request.param == "embedded":
        with EmbeddedBroker() as broker:
            yield broker.endpoint
    else:
        yield parse_mqtt_url(MOSQUITTO_URL)


@pytest.fixture
def topics() -> Topics:
    return Topics(f"t-{secrets.token_hex(6)}/v1")


@dataclass(frozen=True)
class Received:
    topic: str
    parsed: ParsedTopic
    payload: bytes


class Inbox:
    """Collects what the server link receives and lets a test wait for a message."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._messages: list[Received] = []

    def __call__(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        with self._changed:
            self._messages.append(Received(topic, parsed, payload))
            self._changed.notify_all()

    def wait_for(self, pick: Callable[[list[Received]], T | None], timeout_s: float = WAIT_S) -> T:
        with self._changed:
            found = self._changed.wait_for(lambda: pick(self._messages), timeout_s)
            if not found:
                raise AssertionError(f"timed out; received {[m.topic for m in self._messages]}")
            return found

    def acks(self, code: str) -> list[CommandAck]:
        return [decode(CommandAck, m.payload) for m in self._of(code, EventName.ACK)]

    def runs(self, code: str) -> list[RunEvent]:
        return [decode(RunEvent, m.payload) for m in self._of(code, EventName.RUN)]

    def states(self, code: str) -> list[StateMessage]:
        return [
            decode(StateMessage, m.payload)
            for m in self._snapshot()
            if m.parsed.code == code and m.parsed.kind is TopicKind.STATE and m.payload
        ]

    def wait_acks(self, code: str, count: int) -> list[CommandAck]:
        return self.wait_for(lambda _: acks if len(acks := self.acks(code)) >= count else None)

    def wait_run_event(self, code: str, kind: RunEventKind) -> RunEvent:
        return self.wait_for(lambda _: next((e for e in self.runs(code) if e.event is kind), None))

    def wait_state(
        self, code: str, presence: DevicePresence, timeout_s: float = WAIT_S
    ) -> StateMessage:
        return self.wait_for(
            lambda _: next((s for s in self.states(code) if s.state is presence), None),
            timeout_s,
        )

    def _of(self, code: str, name: EventName) -> list[Received]:
        return [m for m in self._snapshot() if m.parsed.code == code and m.parsed.name is name]

    def _snapshot(self) -> list[Received]:
        with self._changed:
            return list(self._messages)


@dataclass(frozen=True)
class Server:
    link: MqttLink
    inbox: Inbox


@pytest.fixture
def make_server(endpoint: MqttEndpoint, topics: Topics) -> Iterator[Callable[[], Server]]:
    links: list[MqttLink] = []

    def make() -> Server:
        inbox = Inbox()
        link = MqttLink(endpoint, topics, f"srv-{secrets.token_hex(6)}", inbox)
        link.start(timeout_s=WAIT_S)
        links.append(link)
        return Server(link, inbox)

    yield make
    for link in links:
        link.stop()


@pytest.fixture
def server(make_server: Callable[[], Server]) -> Server:
    return make_server()


@pytest.fixture
def code(endpoint: MqttEndpoint, topics: Topics) -> Iterator[str]:
    device_code = f"dev-{secrets.token_hex(4)}"
    yield device_code
    _forget_device(endpoint, topics, device_code)


def _forget_device(endpoint: MqttEndpoint, topics: Topics, device_code: str) -> None:
    """Drop the device's persistent session and retained state from a shared broker."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=device_code,
        clean_session=True,
        protocol=mqtt.MQTTv311,
    )
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    client.publish(topics.state(device_code), b"", qos=1, retain=True).wait_for_publish(WAIT_S)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def make_agent(
    endpoint: MqttEndpoint, topics: Topics, code: str
) -> Iterator[Callable[..., tuple[DeviceAgent, SimulatedRelay]]]:
    agents: list[DeviceAgent] = []

    def make(**options: Any) -> tuple[DeviceAgent, SimulatedRelay]:
        relay = SimulatedRelay()
        agent = DeviceAgent(code, endpoint, topics, relay, **options)
        agent.start(timeout_s=WAIT_S)
        agents.append(agent)
        return agent, relay

    yield make
    for agent in agents:
        agent.stop()


def start_command(
    cmd_id: str = "cmd-1", duration_s: int = 1800, **overrides: object
) -> StartCommand:
    now = datetime.now(UTC)
    fields: dict[str, object] = {
        "cmd_id": cmd_id,
        "order_id": f"order-{cmd_id}",
        "program": "massage-30",
        "duration_s": duration_s,
        "issued_at": now,
        "expires_at": now + timedelta(minutes=3),
    }
    fields.update(overrides)
    return StartCommand.model_validate(fields)


# --- the happy path -----------------------------------------------------------


def test_start_command_runs_the_program_on_scaled_device_time(
    server: Server, make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]], code: str
) -> None:
    # Given a device whose clock runs 1000x fast, reporting progress every 5 device minutes
    _agent, relay = make_agent(time_scale=1000.0, progress_every_s=300.0)
    command = start_command(duration_s=1800)

    # When the server sends a 30-minute program
    server.link.publish_start(code, command)
    ended = server.inbox.wait_run_event(code, RunEventKind.ENDED)

    # Then the device accepted it, ran it once and reported every step in order
    [ack] = server.inbox.acks(code)
    assert ack.cmd_id == "cmd-1"
    assert ack.status is AckStatus.ACCEPTED
    assert ack.reason is None
    assert ack.run_id is not None
    events = server.inbox.runs(code)
    assert [(e.event, e.seq, e.elapsed_s, e.remaining_s) for e in events] == [
        (RunEventKind.STARTED, 0, 0, 1800),
        (RunEventKind.PROGRESS, 1, 300, 1500),
        (RunEventKind.PROGRESS, 2, 600, 1200),
        (RunEventKind.PROGRESS, 3, 900, 900),
        (RunEventKind.PROGRESS, 4, 1200, 600),
        (RunEventKind.PROGRESS, 5, 1500, 300),
        (RunEventKind.ENDED, 6, 1800, 0),
    ]
    assert {(e.run_id, e.cmd_id, e.order_id) for e in events} == {
        (ack.run_id, "cmd-1", "order-cmd-1")
    }
    assert ended.reason is EndReason.COMPLETED
    assert ended.actual_run_s == 1800
    # And the relay was on once, for 1.8 wall seconds (plus scheduling slack)
    [on_period] = relay.on_periods()
    assert 1.8 <= on_period < 2.1
    assert relay.is_on is False


def test_device_announces_itself_online_with_its_boot_id(
    server: Server, make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]], code: str
) -> None:
    make_agent(boot_id=7)

    online = server.inbox.wait_state(code, DevicePresence.ONLINE)

    assert online.boot_id == 7
    assert online.fw == "roompay-sim/0.1.0"
    assert online.ts is not None


def test_device_sends_heartbeats(
    server: Server, make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]], code: str
) -> None:
    make_agent(heartbeat_s=0.05)

    received = server.inbox.wait_for(
        lambda messages: next((m for m in messages if m.parsed.name is EventName.HB), None)
    )

    beat = decode(Heartbeat, received.payload)
    assert beat.relay_on is False
    assert beat.run_id is None


# --- commands the device must not run (again) ----------------------------------


def test_same_cmd_id_twice_runs_once_and_answers_duplicate(
    server: Server, make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]], code: str
) -> None:
    _agent, relay = make_agent(time_scale=1000.0, progress_every_s=600.0)
    command = start_command(duration_s=600)

    server.link.publish_start(code, command)
    server.link.publish_start(code, command)
    accepted, duplicate = server.inbox.wait_acks(code, 2)
    server.inbox.wait_run_event(code, RunEventKind.ENDED)

    assert accepted.status is AckStatus.ACCEPTED
    assert duplicate == accepted.model_copy(
        update={"status": AckStatus.DUPLICATE, "ts": duplicate.ts}
    )
    assert [e.event for e in server.inbox.runs(code)] == [RunEventKind.STARTED, RunEventKind.ENDED]
    assert len(relay.on_periods()) == 1


def test_expired_command_is_rejected_and_never_switches_the_relay(
    server: Server, make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]], code: str
) -> None:
    _agent, relay = make_agent(time_scale=1000.0)
    long_ago = datetime.now(UTC) - timedelta(minutes=10)
    command = start_command(issued_at=long_ago, expires_at=long_ago + timedelta(minutes=3))

    server.link.publish_start(code, command)
    [ack] = server.inbox.wait_acks(code, 1)

    assert ack.status is AckStatus.REJECTED
    assert ack.reason == "expired"
    assert ack.run_id is None
    assert relay.switches == []
    assert server.inbox.runs(code) == []


def test_start_while_busy_is_rejected(
    server: Server, make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]], code: str
) -> None:
    # Given a device in the middle of a one-hour run at normal speed
    agent, relay = make_agent()
    server.link.publish_start(code, start_command("cmd-a", duration_s=3600))
    server.inbox.wait_run_event(code, RunEventKind.STARTED)

    # When another order's command arrives
    server.link.publish_start(code, start_command("cmd-b"))
    first, second = server.inbox.wait_acks(code, 2)

    # Then it is refused and the first run goes on alone
    assert (first.cmd_id, first.status) == ("cmd-a", AckStatus.ACCEPTED)
    assert (second.cmd_id, second.status, second.reason) == ("cmd-b", AckStatus.REJECTED, "busy")
    assert second.run_id is None
    assert relay.is_on is True
    # And stopping the device ends the run as a local stop
    agent.stop()
    ended = server.inbox.wait_run_event(code, RunEventKind.ENDED)
    assert ended.cmd_id == "cmd-a"
    assert ended.reason is EndReason.LOCAL_STOP
    assert ended.actual_run_s == ended.elapsed_s
    assert ended.remaining_s == 3600 - ended.elapsed_s
    assert relay.is_on is False
    assert len(relay.on_periods()) == 1


def test_bad_payload_with_a_cmd_id_is_rejected(
    server: Server,
    make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]],
    code: str,
    topics: Topics,
) -> None:
    _agent, relay = make_agent()

    server.link.publish(topics.command(code, CommandName.START), b"no json at all", qos=1)
    server.link.publish(
        topics.command(code, CommandName.START), b'{"cmd_id":"cmd-x","duration_s":"long"}', qos=1
    )
    [ack] = server.inbox.wait_acks(code, 1)

    assert (ack.cmd_id, ack.status, ack.reason) == ("cmd-x", AckStatus.REJECTED, "bad_payload")
    assert relay.switches == []


# --- presence -----------------------------------------------------------------


def test_stop_leaves_a_retained_offline_for_new_subscribers(
    make_server: Callable[[], Server],
    make_agent: Callable[..., tuple[DeviceAgent, SimulatedRelay]],
    code: str,
) -> None:
    agent, _relay = make_agent(boot_id=4)

    agent.stop()
    late_server = make_server()

    offline = late_server.inbox.wait_state(code, DevicePresence.OFFLINE)
    assert offline.boot_id == 4
    assert [s.state for s in late_server.inbox.states(code)] == [DevicePresence.OFFLINE]


def test_killed_device_process_leaves_a_lost_will(
    server: Server, endpoint: MqttEndpoint, topics: Topics, code: str
) -> None:
    with device_process(endpoint, topics, code) as device:
        server.inbox.wait_state(code, DevicePresence.ONLINE, timeout_s=SPAWN_WAIT_S)

        device.kill()
        device.wait(WAIT_S)

        lost = server.inbox.wait_state(code, DevicePresence.LOST)
        assert lost == StateMessage(state=DevicePresence.LOST, boot_id=1)


def test_device_process_runs_a_command_and_stops_on_sigterm(
    server: Server, endpoint: MqttEndpoint, topics: Topics, code: str
) -> None:
    with device_process(endpoint, topics, code) as device:
        server.inbox.wait_state(code, DevicePresence.ONLINE, timeout_s=SPAWN_WAIT_S)

        server.link.publish_start(code, start_command(duration_s=900))
        ended = server.inbox.wait_run_event(code, RunEventKind.ENDED)
        device.send_signal(signal.SIGTERM)
        _out, err = device.communicate(timeout=WAIT_S)

        assert (ended.reason, ended.actual_run_s) == (EndReason.COMPLETED, 900)
        assert device.returncode == 0
        assert "Traceback" not in err
        server.inbox.wait_state(code, DevicePresence.OFFLINE)


@contextmanager
def device_process(
    endpoint: MqttEndpoint, topics: Topics, code: str
) -> Iterator[subprocess.Popen[str]]:
    """Run the agent the way an operator would, and make sure it is gone afterwards."""
    command = [
        sys.executable,
        "-m",
        "roompay.device.agent",
        "--code",
        code,
        "--mqtt-url",
        f"mqtt://{endpoint.host}:{endpoint.port}",
        "--topic-root",
        topics.root,
        "--time-scale",
        "1000",
        "--progress-every-s",
        "300",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as device:
        try:
            yield device
        finally:
            if device.poll() is None:
                device.kill()
            device.communicate(timeout=WAIT_S)


# --- the server link ----------------------------------------------------------


def test_link_drops_foreign_topics_and_survives_a_failing_handler(
    endpoint: MqttEndpoint, topics: Topics, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    delivered = threading.Event()

    def handler(topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        seen.append(topic)
        if payload == b"boom":
            raise RuntimeError("handler bug")
        delivered.set()

    link = MqttLink(endpoint, topics, f"srv-{secrets.token_hex(6)}", handler)
    link.start(timeout_s=WAIT_S)
    try:
        link.publish(f"{topics.root}/dev/d1/evt/unknown", b"x", qos=1)
        link.publish(topics.event("d1", EventName.FAULT), b"boom", qos=1)
        link.publish(topics.event("d1", EventName.HB), b"fine", qos=1)

        assert delivered.wait(WAIT_S)
        assert seen == [topics.event("d1", EventName.FAULT), topics.event("d1", EventName.HB)]
        assert link.connected is True
        assert "handler bug" in caplog.text
        assert "dropped a message" in caplog.text
    finally:
        link.stop()
    assert link.connected is False


def test_link_start_fails_clearly_without_a_broker(topics: Topics) -> None:
    with EmbeddedBroker() as broker:
        gone = broker.endpoint
    link = MqttLink(gone, topics, "srv-nobody", lambda *_: None)

    with pytest.raises(ConnectError, match=f"MQTT broker mqtt://127.0.0.1:{gone.port}"):
        link.start(timeout_s=2.0)


# --- the embedded broker ------------------------------------------------------


# The wildcard address is here to prove it is refused.
@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "192.168.1.10", "::", "localhost", "example.com"],  # noqa: S104
)
def test_embedded_broker_refuses_non_loopback_addresses(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(host=host)


def test_embedded_broker_reports_a_port_it_cannot_bind() -> None:
    with EmbeddedBroker() as taken:
        broker = EmbeddedBroker(port=taken.port)

        with pytest.raises(EmbeddedBrokerError, match="failed to start"):
            broker.start()


def test_embedded_broker_stops_cleanly_with_clients_connected(topics: Topics) -> None:
    before = set(threading.enumerate())
    broker = EmbeddedBroker()
    broker.start()
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    link = MqttLink(broker.endpoint, topics, "srv-1", lambda *_: None)
    link.start(timeout_s=WAIT_S)

    broker.stop()
    link.stop()

    assert set(threading.enumerate()) == before

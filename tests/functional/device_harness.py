"""What the device-link tests share: brokers, a recording server, signed commands, agents.

Every test runs against the embedded broker and against Mosquitto, each under its
own topic root so that runs sharing one Mosquitto never see each other.
"""

import contextlib
import itertools
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from roompay.device.agent import DeviceAgent
from roompay.device.relay import SimulatedRelay
from roompay.iot.broker import EmbeddedBroker
from roompay.iot.link import MqttLink
from roompay.protocol import (
    CommandName,
    EventName,
    MqttEndpoint,
    ParsedTopic,
    TopicKind,
    Topics,
    parse_mqtt_url,
)
from roompay.protocol.messages import (
    BootEvent,
    CommandAck,
    DevicePresence,
    RunAck,
    RunEvent,
    RunEventKind,
    StartCommand,
    StartCommandBody,
    StateMessage,
    StopCommand,
    StopCommandBody,
    decode,
    encode,
)
from roompay.protocol.signing import device_key, sign_command

MOSQUITTO_URL = os.environ.get("ROOMPAY_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
WAIT_S = 10.0
# A fresh interpreter importing pydantic and paho takes seconds on a loaded machine.
SPAWN_WAIT_S = 30.0
MASTER_SECRET = b"device-link tests master secret"
KEY_ID = "k1"
T = TypeVar("T")


def key_for(code: str, key_id: str = KEY_ID) -> bytes:
    """Return the command key the server would give device `code`."""
    return device_key(MASTER_SECRET, code, key_id)


# --- brokers and topics -------------------------------------------------------


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


# --- the server's view ----------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    parsed: ParsedTopic
    payload: bytes


class Inbox:
    """Collects what the server link receives and lets a test wait for a message.

    `drop` decides which messages the server never gets to see (a lost answer).
    """

    def __init__(self, drop: Callable[[Received], bool] | None = None) -> None:
        self._changed = threading.Condition()
        self._messages: list[Received] = []
        self._drop = drop

    def __call__(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        received = Received(topic, parsed, payload)
        if self._drop is not None and self._drop(received):
            return
        with self._changed:
            self._messages.append(received)
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

    def distinct_runs(self, code: str) -> list[RunEvent]:
        """Run events without the re-sends, in the order first received."""
        seen: dict[tuple[str, int], RunEvent] = {}
        for event in self.runs(code):
            seen.setdefault((event.run_id, event.seq), event)
        return list(seen.values())

    def boots(self, code: str) -> list[BootEvent]:
        return [decode(BootEvent, m.payload) for m in self._of(code, EventName.BOOT)]

    def states(self, code: str) -> list[StateMessage]:
        return [
            decode(StateMessage, m.payload)
            for m in self._snapshot()
            if m.parsed.code == code and m.parsed.kind is TopicKind.STATE and m.payload
        ]

    def wait_acks(self, code: str, count: int) -> list[CommandAck]:
        return self.wait_for(lambda _: acks if len(acks := self.acks(code)) >= count else None)

    def wait_ack(self, code: str, cmd_id: str) -> CommandAck:
        return self.wait_for(
            lambda _: next((a for a in self.acks(code) if a.cmd_id == cmd_id), None)
        )

    def wait_run_event(self, code: str, kind: RunEventKind, run_id: str | None = None) -> RunEvent:
        return self.wait_for(
            lambda _: next(
                (
                    e
                    for e in self.runs(code)
                    if e.event is kind and (run_id is None or e.run_id == run_id)
                ),
                None,
            )
        )

    def wait_boot(self, code: str, boot_id: int) -> BootEvent:
        return self.wait_for(
            lambda _: next((b for b in self.boots(code) if b.boot_id == boot_id), None)
        )

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
    topics: Topics

    def send(self, code: str, command: StartCommand | StopCommand | RunAck) -> None:
        """Publish a command to device `code` at QoS 1, as the server does."""
        match command:
            case StartCommand():
                name = CommandName.START
            case StopCommand():
                name = CommandName.STOP
            case RunAck():
                name = CommandName.RUN_ACK
        self.link.publish(self.topics.command(code, name), encode(command), qos=1)


@pytest.fixture
def make_server(endpoint: MqttEndpoint, topics: Topics) -> Iterator[Callable[..., Server]]:
    links: list[MqttLink] = []

    def make(inbox: Inbox | None = None) -> Server:
        inbox = inbox or Inbox()
        link = MqttLink(endpoint, topics, f"srv-{secrets.token_hex(6)}", inbox)
        link.start(timeout_s=WAIT_S)
        links.append(link)
        return Server(link, inbox, topics)

    yield make
    for link in links:
        link.stop()


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


# --- signed commands --------------------------------------------------------------


class Commands:
    """Signs commands for one device the way the server does: each with the next `seq`."""

    def __init__(self, code: str, key: bytes | None = None) -> None:
        self.code = code
        self.key = key or key_for(code)
        self._seq = itertools.count(1)

    def start(
        self, cmd_id: str = "cmd-1", duration_s: int = 1800, **overrides: object
    ) -> StartCommand:
        now = datetime.now(UTC)
        fields: dict[str, object] = {
            "cmd_id": cmd_id,
            "order_id": f"order-{cmd_id}",
            "program": "massage-30",
            "duration_s": duration_s,
            "issued_at": now,
            "expires_at": now + timedelta(minutes=3),
            "seq": next(self._seq),
            "key_id": KEY_ID,
        }
        fields.update(overrides)
        return sign_command(StartCommandBody.model_validate(fields), self.key, self.code)

    def stop(self, cmd_id: str, run_id: str, **overrides: object) -> StopCommand:
        now = datetime.now(UTC)
        fields: dict[str, object] = {
            "cmd_id": cmd_id,
            "run_id": run_id,
            "order_id": "order-any",
            "reason": "guest_request",
            "issued_at": now,
            "expires_at": now + timedelta(minutes=3),
            "seq": next(self._seq),
            "key_id": KEY_ID,
        }
        fields.update(overrides)
        return sign_command(StopCommandBody.model_validate(fields), self.key, self.code)


@pytest.fixture
def code(endpoint: MqttEndpoint, topics: Topics) -> Iterator[str]:
    device_code = f"dev-{secrets.token_hex(4)}"
    yield device_code
    forget_device(endpoint, topics, device_code)


@pytest.fixture
def commands(code: str) -> Commands:
    return Commands(code)


def forget_device(endpoint: MqttEndpoint, topics: Topics, device_code: str) -> None:
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


# --- devices ------------------------------------------------------------------------


class WatchedRelay(SimulatedRelay):
    """A simulated relay a test can wait on."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def on(self) -> None:
        super().on()
        with self._changed:
            self._changed.notify_all()

    def off(self) -> None:
        super().off()
        with self._changed:
            self._changed.notify_all()

    def wait_switches(self, count: int, timeout_s: float = WAIT_S) -> None:
        """Wait until the relay has changed `count` times."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.switches) >= count, timeout_s):
                raise AssertionError(f"relay changed {len(self.switches)} times, not {count}")

    def on_time(self) -> float:
        """Return the wall seconds the relay has been on in completed periods."""
        return sum(self.on_periods())


AgentFactory = Callable[..., tuple[DeviceAgent, WatchedRelay]]


@pytest.fixture
def make_agent(endpoint: MqttEndpoint, topics: Topics, code: str) -> Iterator[AgentFactory]:
    """Build and start agents for the test's device; `via` connects through another address."""
    agents: list[DeviceAgent] = []

    def make(
        *, via: MqttEndpoint | None = None, journal_path: Path | None = None, **options: Any
    ) -> tuple[DeviceAgent, WatchedRelay]:
        relay = WatchedRelay()
        options.setdefault("device_key", key_for(code))
        agent = DeviceAgent(
            code, via or endpoint, topics, relay, journal_path=journal_path, **options
        )
        agents.append(agent)
        agent.start(timeout_s=WAIT_S)
        return agent, relay

    yield make
    for agent in agents:
        agent.stop()


# --- a connection that can be cut ---------------------------------------------------


class CuttableProxy:
    """A TCP relay to the broker whose connections a test can cut and allow again."""

    def __init__(self, target: MqttEndpoint) -> None:
        self._target = (target.host, target.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._lock = threading.Lock()
        self._open = True
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def endpoint(self) -> MqttEndpoint:
        return MqttEndpoint(host="127.0.0.1", port=self._listener.getsockname()[1])

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore`."""
        with self._lock:
            self._open = False
            self._close_sockets()

    def restore(self) -> None:
        """Let connections through again."""
        with self._lock:
            self._open = True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._open = False
            self._close_sockets()
        with contextlib.suppress(OSError):
            # Wakes the blocked accept(); close() alone does not on Linux.
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(WAIT_S)
        for thread in self._threads:
            thread.join(WAIT_S)

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    client.close()
                    if self._closed:
                        return
                    continue
                upstream = socket.create_connection(self._target, timeout=WAIT_S)
                upstream.settimeout(None)
                self._sockets += [client, upstream]
                for source, sink in ((client, upstream), (upstream, client)):
                    pump = threading.Thread(target=_pump, args=(source, sink), daemon=True)
                    self._threads.append(pump)
                    pump.start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        return
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        return


@pytest.fixture
def proxy(endpoint: MqttEndpoint) -> Iterator[CuttableProxy]:
    relay = CuttableProxy(endpoint)
    yield relay
    relay.close()

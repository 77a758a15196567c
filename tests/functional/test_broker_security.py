"""One identity per device, own topics only: a real Mosquitto and the embedded broker.

Devices A and B and the `backend` account are provisioned in a scratch SQLite
database. Mosquitto runs as a subprocess on the configuration written from that
database; the embedded broker gets the same accounts. Each check names what a
broker refuses; where amqtt cannot enforce something the test asserts what it does
instead (docs/protocol.md, "Broker security").

"Nothing arrived" is shown with a barrier: after the forbidden message, an allowed one
is sent on the same path; once that arrives, the forbidden one would have too.
"""

import json
import os
import queue
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import typer
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select
from typer.testing import CliRunner

from roompay.cli_fleet import SHOWN_ONCE, register
from roompay.iot.broker import EmbeddedBroker
from roompay.iot.credentials import BACKEND_USERNAME, hash_password, verify_password
from roompay.iot.mosquitto import MosquittoFiles, MosquittoOptions, write_config
from roompay.protocol.signing import device_key
from roompay.protocol.topics import CommandName, EventName, Topics
from roompay.services.provisioning import (
    DeviceCredentials,
    add_device,
    backend_account,
    device_accounts,
    rotate_password,
)
from roompay.services.seed import create_hotel, ensure_operator
from roompay.settings import DEFAULT_SECRET
from roompay.store.db import make_engine, session_factory, transaction, upgrade
from roompay.store.models import Device
from tests.support.services import tcp_open
from tests.support.waiting import wait_for

ROOT = "sec/v1"
TOPICS = Topics(ROOT)
BACKEND_PASSWORD = "backend-password-for-tests-only"
BACKEND_URL = f"mqtt://{BACKEND_USERNAME}:{BACKEND_PASSWORD}@127.0.0.1:1883"
NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
WAIT_S = 10.0
NOT_AUTHORIZED = "Not authorized"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# --- fixtures -----------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """A migrated database with hotel `sec`, devices A and B, and their credentials."""

    database_url: str
    a: DeviceCredentials
    b: DeviceCredentials


@dataclass(frozen=True)
class Broker:
    """A running broker under test."""

    kind: str
    port: int


def scratch_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'roompay.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            operator = ensure_operator(session, "roompay", "Roompay Appliances Co.")
            create_hotel(session, operator, "sec", "Security Hotel", rooms=2)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    url = scratch_database(tmp_path)
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            a = add_device(session, "sec", "clothes_dryer", "101", "DEV-A", NOW).credentials
            b = add_device(session, "sec", "air_purifier", "102", None, NOW).credentials
    finally:
        engine.dispose()
    return Fleet(url, a, b)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_files(database_url: str, directory: Path, port: int) -> MosquittoFiles:
    engine = make_engine(database_url)
    try:
        with transaction(session_factory(engine)) as session:
            devices = device_accounts(session).accounts
    finally:
        engine.dispose()
    # As root Mosquitto would drop to `mosquitto`, which cannot enter pytest's tmp_path.
    run_as = "root" if os.geteuid() == 0 else None
    return write_config(
        directory,
        backend_account(BACKEND_URL),
        devices,
        MosquittoOptions(port=port, topic_root=ROOT, run_as=run_as),
    )


@pytest.fixture
def running_mosquitto() -> Iterator[Any]:
    """Start Mosquitto on a config; kill it when the test ends, whatever happened."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(files: MosquittoFiles, port: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(files.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        wait_for(
            lambda: process.poll() is not None or tcp_open("127.0.0.1", port, 0.2),
            WAIT_S,
            "Mosquitto listening",
        )
        if process.poll() is not None:
            stderr = process.stderr.read().decode() if process.stderr else ""
            pytest.fail(f"Mosquitto exited with {process.returncode}: {stderr}")
        return process

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(
    request: pytest.FixtureRequest, fleet: Fleet, tmp_path: Path, running_mosquitto: Any
) -> Iterator[Broker]:
    if request.param == "mosquitto":
        port = free_port()
        running_mosquitto(mosquitto_files(fleet.database_url, tmp_path / "mqtt", port), port)
        yield Broker("mosquitto", port)
        return
    engine = make_engine(fleet.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            users = {a.username: a.password_hash for a in device_accounts(session).accounts}
    finally:
        engine.dispose()
    users[BACKEND_USERNAME] = hash_password(BACKEND_PASSWORD)
    with EmbeddedBroker(users=users, acl_root=ROOT) as embedded:
        yield Broker("embedded", embedded.port)


# --- a small synchronous MQTT client ------------------------------------------


class Probe:
    """A paho client (MQTT 3.1.1) that records what happens to it, for assertions."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None,
        client_id: str = "",
        *,
        will_topic: str | None = None,
        clean_session: bool = True,
    ) -> None:
        self.port = port
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.connack: queue.Queue[str] = queue.Queue()
        self.disconnected = threading.Event()
        self._subacks: queue.Queue[list[int]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or (username or "anonymous-probe"),
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will_topic is not None:
            self.client.will_set(will_topic, b'{"state":"lost","boot_id":1}', qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def connect(self) -> str:
        """Connect and return the CONNACK's reason ("Success" or why not)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=WAIT_S)
        except queue.Empty:
            # amqtt may close the socket without a CONNACK.
            if self.disconnected.wait(WAIT_S):
                return "closed without CONNACK"
            raise

    def subscribe(self, topic_filter: str) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK's codes (1 granted, 128 refused)."""
        self.client.subscribe(topic_filter, qos=1)
        return self._subacks.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (a denied publish is acked too)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def next_message(self) -> tuple[str, bytes, bool]:
        """Return the next delivered (topic, payload, retain)."""
        return self.messages.get(timeout=WAIT_S)

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, so the broker publishes the will."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        assert self.disconnected.wait(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack.put(str(reason))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        self._subacks.put([int(code.value) for code in codes])

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.disconnected.set()


@pytest.fixture
def probes() -> Iterator[Any]:
    """Make probes that are all closed at the end of the test."""
    made: list[Probe] = []

    def make(port: int, username: str | None, password: str | None, **kwargs: Any) -> Probe:
        probe = Probe(port, username, password, **kwargs)
        made.append(probe)
        return probe

    try:
        yield make
    finally:
        for probe in made:
            probe.close()


def connected(probes: Any, port: int, username: str, password: str, **kwargs: Any) -> Probe:
    probe: Probe = probes(port, username, password, **kwargs)
    assert probe.connect() == "Success"
    return probe


def device(probes: Any, broker: Broker, creds: DeviceCredentials) -> Probe:
    """A device as the agent runs it: own cmd/# subscribed."""
    probe = connected(probes, broker.port, creds.mqtt_username, creds.mqtt_password)
    assert probe.subscribe(TOPICS.device_subscription(creds.mqtt_username)) == [1]
    return probe


def backend(probes: Any, broker: Broker) -> Probe:
    """The server: every device's events and state subscribed."""
    probe = connected(
        probes, broker.port, BACKEND_USERNAME, BACKEND_PASSWORD, client_id="roompay-server-1"
    )
    for pattern in TOPICS.server_subscriptions():
        assert probe.subscribe(pattern) == [1]
    return probe


# --- authentication -----------------------------------------------------------


def test_anonymous_clients_are_refused(broker: Broker, probes: Any) -> None:
    assert probes(broker.port, None, None).connect() == NOT_AUTHORIZED


def test_wrong_passwords_are_refused(broker: Broker, probes: Any, fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    assert probes(broker.port, a.mqtt_username, "wrong").connect() == NOT_AUTHORIZED
    assert probes(broker.port, b.mqtt_username, a.mqtt_password).connect() == NOT_AUTHORIZED
    assert probes(broker.port, BACKEND_USERNAME, a.mqtt_password).connect() == NOT_AUTHORIZED
    assert probes(broker.port, "nobody", a.mqtt_password).connect() == NOT_AUTHORIZED


def test_our_hashes_log_devices_and_backend_in(broker: Broker, probes: Any, fleet: Fleet) -> None:
    for creds in (fleet.a, fleet.b):
        connected(probes, broker.port, creds.mqtt_username, creds.mqtt_password)
    connected(probes, broker.port, BACKEND_USERNAME, BACKEND_PASSWORD, client_id="srv")


# --- own topics only ----------------------------------------------------------


def test_a_device_does_its_own_cmd_evt_and_state(broker: Broker, probes: Any, fleet: Fleet) -> None:
    code = fleet.a.mqtt_username
    server = backend(probes, broker)
    dev = device(probes, broker, fleet.a)

    server.publish(TOPICS.command(code, CommandName.START), b"start")
    assert dev.next_message() == (TOPICS.command(code, CommandName.START), b"start", False)

    dev.publish(TOPICS.event(code, EventName.ACK), b"ack")
    assert server.next_message() == (TOPICS.event(code, EventName.ACK), b"ack", False)
    dev.publish(TOPICS.state(code), b"online", retain=True)
    assert server.next_message() == (TOPICS.state(code), b"online", False)


def test_a_device_never_receives_another_devices_commands(
    broker: Broker, probes: Any, fleet: Fleet
) -> None:
    a, b = fleet.a.mqtt_username, fleet.b.mqtt_username
    server = backend(probes, broker)
    dev_a = device(probes, broker, fleet.a)
    dev_b = device(probes, broker, fleet.b)

    granted = dev_a.subscribe(TOPICS.device_subscription(b))
    wildcard = dev_a.subscribe(f"{ROOT}/#")
    # Mosquitto grants and filters each delivery; amqtt refuses the SUBSCRIBE.
    assert (granted, wildcard) == (([1], [1]) if broker.kind == "mosquitto" else ([128], [128]))

    server.publish(TOPICS.command(b, CommandName.START), b"for-b")
    server.publish(TOPICS.command(a, CommandName.START), b"barrier")
    assert dev_b.next_message() == (TOPICS.command(b, CommandName.START), b"for-b", False)
    assert dev_a.next_message()[1] == b"barrier"
    assert dev_a.messages.empty()


def test_a_device_cannot_publish_as_another_device(
    broker: Broker, probes: Any, fleet: Fleet
) -> None:
    a, b = fleet.a.mqtt_username, fleet.b.mqtt_username
    server = backend(probes, broker)
    dev_a = device(probes, broker, fleet.a)
    dev_b = device(probes, broker, fleet.b)

    dev_a.publish(TOPICS.event(b, EventName.ACK), b"spoofed-evt")
    dev_a.publish(TOPICS.state(b), b"spoofed-state", retain=True)
    dev_a.publish(TOPICS.command(b, CommandName.START), b"spoofed-cmd")
    dev_a.publish(f"{ROOT}/other", b"outside")
    dev_a.publish(TOPICS.event(a, EventName.HB), b"barrier")
    assert server.next_message() == (TOPICS.event(a, EventName.HB), b"barrier", False)
    assert server.messages.empty()

    server.publish(TOPICS.command(b, CommandName.START), b"real")
    assert dev_b.next_message() == (TOPICS.command(b, CommandName.START), b"real", False)
    assert dev_b.messages.empty()

    # Nor was the spoofed state retained for later subscribers. (One connection per
    # username on Mosquitto: the clientid is the username, so the first must go.)
    server.close()
    late = connected(probes, broker.port, BACKEND_USERNAME, BACKEND_PASSWORD, client_id="late")
    assert late.subscribe(TOPICS.state(b)) == [1]
    late.publish(TOPICS.state(b), b"barrier")
    assert late.next_message() == (TOPICS.state(b), b"barrier", False)


def test_the_backend_does_everything_under_the_root(
    broker: Broker, probes: Any, fleet: Fleet
) -> None:
    server = connected(probes, broker.port, BACKEND_USERNAME, BACKEND_PASSWORD, client_id="srv")
    assert server.subscribe(f"{ROOT}/#") == [1]
    topics = [
        TOPICS.command(fleet.b.mqtt_username, CommandName.STOP),
        TOPICS.event(fleet.a.mqtt_username, EventName.RUN),
        TOPICS.state(fleet.b.mqtt_username),
        f"{ROOT}/anything/else",
    ]
    for topic in topics:
        server.publish(topic, b"x")
    assert [server.next_message()[0] for _ in topics] == topics


def test_a_device_gets_no_other_devices_retained_state_on_connect(
    broker: Broker, probes: Any, fleet: Fleet
) -> None:
    # amqtt replays retained messages for every filter on the broker (here the
    # server's `+/state`); the embedded broker's subclass closes that leak.
    server = backend(probes, broker)
    dev_b = device(probes, broker, fleet.b)
    dev_b.publish(TOPICS.state(fleet.b.mqtt_username), b"online-b", retain=True)
    assert server.next_message()[1] == b"online-b"

    dev_a = device(probes, broker, fleet.a)
    server.publish(TOPICS.command(fleet.a.mqtt_username, CommandName.START), b"barrier")
    assert dev_a.next_message()[1] == b"barrier"
    assert dev_a.messages.empty()


def test_a_device_cannot_take_another_devices_client_id(
    broker: Broker, probes: Any, fleet: Fleet
) -> None:
    dev_a = device(probes, broker, fleet.a)
    impostor = probes(
        broker.port,
        fleet.b.mqtt_username,
        fleet.b.mqtt_password,
        client_id=fleet.a.mqtt_username,
        clean_session=False,
    )
    if broker.kind == "embedded":
        # Refused, but too late: see the next test for what that does to A.
        assert impostor.connect() == NOT_AUTHORIZED
        return
    # Mosquitto renames the impostor to its own username; A is untouched.
    assert impostor.connect() == "Success"
    server = backend(probes, broker)
    server.publish(TOPICS.command(fleet.a.mqtt_username, CommandName.START), b"still-a")
    assert dev_a.next_message()[1] == b"still-a"
    assert not dev_a.disconnected.is_set()


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_a_refused_connect_naming_a_devices_client_id(
    broker: Broker, probes: Any, fleet: Fleet, clean_session: bool
) -> None:
    dev_a = device(probes, broker, fleet.a)
    attacker = probes(
        broker.port, None, None, client_id=fleet.a.mqtt_username, clean_session=clean_session
    )
    assert attacker.connect() == NOT_AUTHORIZED
    server = backend(probes, broker)
    server.publish(TOPICS.command(fleet.a.mqtt_username, CommandName.START), b"still-a")
    if broker.kind == "mosquitto":
        assert dev_a.next_message()[1] == b"still-a"
        assert not dev_a.disconnected.is_set()
    elif clean_session:
        # Gap: before the password check amqtt deleted A's session and put the refused
        # client's in its place. A stays connected but is deaf, even after subscribing
        # again, until it reconnects. The server's own copy shows the command went out.
        assert dev_a.subscribe(TOPICS.device_subscription(fleet.a.mqtt_username)) == [1]
        assert server.subscribe(TOPICS.device_subscription(fleet.a.mqtt_username)) == [1]
        server.publish(TOPICS.command(fleet.a.mqtt_username, CommandName.START), b"lost")
        assert server.next_message()[1] == b"lost"
        with pytest.raises(queue.Empty):
            dev_a.messages.get(timeout=1.0)
        assert not dev_a.disconnected.is_set()
    else:
        # Gap: amqtt took A's session over before the password check: A is cut off.
        assert dev_a.disconnected.wait(WAIT_S)


def test_a_device_cannot_send_a_last_will_to_another_devices_topic(
    broker: Broker, probes: Any, fleet: Fleet
) -> None:
    will = TOPICS.command(fleet.b.mqtt_username, CommandName.START)
    sneaky = probes(broker.port, fleet.a.mqtt_username, fleet.a.mqtt_password, will_topic=will)
    if broker.kind == "embedded":
        # amqtt would publish any will unchecked; our auth plugin refuses the CONNECT.
        assert sneaky.connect() == NOT_AUTHORIZED
        return
    # Mosquitto accepts the CONNECT and checks the will when it would publish it.
    assert sneaky.connect() == "Success"
    dev_b = device(probes, broker, fleet.b)
    sneaky.drop()
    server = backend(probes, broker)
    server.publish(TOPICS.command(fleet.b.mqtt_username, CommandName.START), b"barrier")
    assert dev_b.next_message() == (will, b"barrier", False)
    assert dev_b.messages.empty()


def test_the_embedded_broker_refuses_non_loopback_binds_with_users() -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmbeddedBroker(host="0.0.0.0", users={})  # noqa: S104 - the address being refused


def test_the_embedded_broker_refuses_plain_passwords_as_hashes() -> None:
    with pytest.raises(ValueError, match=r"\$7\$"):
        EmbeddedBroker(users={"DEV-A": "plain-password"})


# --- provisioning -------------------------------------------------------------


def test_a_rotated_password_replaces_the_old_one_after_regeneration(
    fleet: Fleet, tmp_path: Path, probes: Any, running_mosquitto: Any
) -> None:
    engine = make_engine(fleet.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            new = rotate_password(session, fleet.a.mqtt_username, NOW)
    finally:
        engine.dispose()
    assert (new.mqtt_username, new.key_id) == (fleet.a.mqtt_username, "k1")
    assert new.mqtt_password != fleet.a.mqtt_password
    port = free_port()
    running_mosquitto(mosquitto_files(fleet.database_url, tmp_path / "mqtt", port), port)
    assert probes(port, new.mqtt_username, fleet.a.mqtt_password).connect() == NOT_AUTHORIZED
    connected(probes, port, new.mqtt_username, new.mqtt_password)


# --- the command line ---------------------------------------------------------


def cli() -> typer.Typer:
    """The fleet commands wired as roompay.cli wires them."""
    app = typer.Typer()
    device_app = typer.Typer()
    app.add_typer(device_app, name="device")
    register(app, device_app)
    return app


def cli_env(database_url: str, mqtt_url: str = BACKEND_URL) -> dict[str, str]:
    return {"ROOMPAY_DATABASE_URL": database_url, "ROOMPAY_MQTT_URL": mqtt_url}


def device_rows(database_url: str) -> list[Device]:
    engine = make_engine(database_url)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(Device).order_by(Device.code)))
    finally:
        engine.dispose()


def device_count(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with session_factory(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Device)) or 0)
    finally:
        engine.dispose()


def test_device_add_prints_the_credentials_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    url = scratch_database(tmp_path)
    result = CliRunner().invoke(
        cli(),
        ["device", "add", "--hotel", "sec", "--kind", "aroma_diffuser", "--room", "102"],
        env=cli_env(url),
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    password = lines[2].removeprefix("MQTT password:  ")
    [row] = device_rows(url)
    assert lines == [
        f"device {row.code} (aroma_diffuser) placed in hotel sec, room 102",
        f"MQTT username:  {row.code}",
        f"MQTT password:  {password}",
        "command key id: k1",
        f"command key:    {device_key(DEFAULT_SECRET.encode(), row.code, 'k1').hex()}",
        SHOWN_ONCE,
    ]
    assert result.stdout.count(password) == 1
    assert row.code.startswith("ARO-0001-")
    assert (row.mqtt_username, row.key_id, row.kind) == (row.code, "k1", "aroma_diffuser")
    assert row.mqtt_password_hash is not None
    assert password not in row.mqtt_password_hash
    assert verify_password(password, row.mqtt_password_hash)


def test_device_add_json_carries_the_credentials(tmp_path: Path) -> None:
    url = scratch_database(tmp_path)
    result = CliRunner().invoke(
        cli(),
        ["device", "add", "--hotel", "sec", "--kind", "clothes_dryer", "--code", "D1", "--json"],
        env=cli_env(url),
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert {k: v for k, v in record.items() if k != "mqtt_password"} == {
        "code": "D1",
        "hotel": "sec",
        "kind": "clothes_dryer",
        "room": None,
        "mqtt_username": "D1",
        "key_id": "k1",
        "command_key_hex": device_key(DEFAULT_SECRET.encode(), "D1", "k1").hex(),
    }
    assert len(record["mqtt_password"]) == 24
    assert result.stderr == SHOWN_ONCE + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hotel", "nowhere", "--kind", "clothes_dryer"], "no hotel with code 'nowhere'"),
        (["--hotel", "sec", "--kind", "toaster"], "unknown kind 'toaster'"),
        (["--hotel", "sec", "--kind", "clothes_dryer", "--room", "999"], "has no room '999'"),
        (["--hotel", "sec", "--kind", "clothes_dryer", "--code", "a/b"], "invalid device code"),
        (["--hotel", "sec", "--kind", "clothes_dryer", "--code", "backend"], "reserved"),
        (["--hotel", "sec", "--kind", "clothes_dryer", "--code", "DEV-A"], "already exists"),
    ],
)
def test_device_add_refuses_bad_input_and_writes_nothing(
    fleet: Fleet, args: list[str], message: str
) -> None:
    before = [(d.code, d.mqtt_password_hash) for d in device_rows(fleet.database_url)]
    result = CliRunner().invoke(cli(), ["device", "add", *args], env=cli_env(fleet.database_url))
    assert result.exit_code == 1
    assert message in result.stderr
    assert result.stdout == ""
    assert [(d.code, d.mqtt_password_hash) for d in device_rows(fleet.database_url)] == before
    assert device_count(fleet.database_url) == 2


def test_broker_mosquitto_config_writes_files_that_mosquitto_runs_with(
    fleet: Fleet, tmp_path: Path, probes: Any, running_mosquitto: Any
) -> None:
    port = free_port()
    directory = tmp_path / "conf"
    args = ["broker", "mosquitto-config", "--dir", str(directory), "--port", str(port)]
    args += ["--topic-root", ROOT]
    if os.geteuid() == 0:
        args += ["--run-as", "root"]
    result = CliRunner().invoke(cli(), args, env=cli_env(fleet.database_url))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in directory.iterdir()) == [
        "acl",
        "data",
        "mosquitto.conf",
        "passwd",
    ]
    users = [line.split(":")[0] for line in (directory / "passwd").read_text().splitlines()]
    assert users == ["backend", *sorted([fleet.a.mqtt_username, fleet.b.mqtt_username])]
    assert f"start the broker:  mosquitto -c {directory / 'mosquitto.conf'}" in result.stdout

    files = MosquittoFiles(
        directory, directory / "mosquitto.conf", directory / "passwd", directory / "acl", directory
    )
    running_mosquitto(files, port)
    connected(probes, port, fleet.a.mqtt_username, fleet.a.mqtt_password)
    connected(probes, port, BACKEND_USERNAME, BACKEND_PASSWORD, client_id="srv")


@pytest.mark.parametrize(
    "mqtt_url", ["embedded", "mqtt://127.0.0.1:1883", "mqtt://back:end@127.0.0.1:1883"]
)
def test_broker_mosquitto_config_writes_nothing_without_usable_backend_credentials(
    fleet: Fleet, tmp_path: Path, mqtt_url: str
) -> None:
    directory = tmp_path / "conf"
    if "back:end" in mqtt_url:
        # A backend user named like a device: the password file would hold it twice.
        mqtt_url = f"mqtt://{fleet.a.mqtt_username}:pw@127.0.0.1:1883"
    result = CliRunner().invoke(
        cli(),
        ["broker", "mosquitto-config", "--dir", str(directory)],
        env=cli_env(fleet.database_url, mqtt_url),
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ")
    assert not directory.exists()

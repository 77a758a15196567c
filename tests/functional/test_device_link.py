"""The device link end to end: server link -> real broker -> device agent -> relay.

Every test runs against the embedded broker and against Mosquitto, each under its
own topic root so that runs sharing one Mosquitto never see each other. The
exactly-once and safety rules have their own module, `test_device_safety`.
"""

# The shared fixtures are imported by name and requested as parameters, which
# pyflakes reads as redefinitions.
# ruff: noqa: F811

import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from roompay.iot.broker import EmbeddedBroker, EmbeddedBrokerError
from roompay.iot.link import MqttLink
from roompay.protocol import (
    CommandName,
    ConnectError,
    EventName,
    MqttEndpoint,
    ParsedTopic,
    Topics,
)
from roompay.protocol.messages import (
    AckStatus,
    DevicePresence,
    EndReason,
    Heartbeat,
    RunEventKind,
    StateMessage,
    decode,
)
from tests.functional.device_harness import (  # noqa: F401 (fixtures, requested by name)
    SPAWN_WAIT_S,
    WAIT_S,
    AgentFactory,
    Commands,
    Server,
    code,
    commands,
    endpoint,
    key_for,
    make_agent,
    make_server,
    server,
    topics,
)

# --- the happy path -----------------------------------------------------------


def test_start_command_runs_the_program_on_scaled_device_time(
    server: Server, make_agent: AgentFactory, code: str, commands: Commands
) -> None:
    # Given a device whose clock runs 1000x fast, reporting progress every 5 device minutes
    _agent, relay = make_agent(time_scale=1000.0, progress_every_s=300.0)
    command = commands.start(duration_s=1800)

    # When the server sends a 30-minute program
    server.send(code, command)
    ended = server.inbox.wait_run_event(code, RunEventKind.ENDED)

    # Then the device accepted it, ran it once and reported every step in order
    [ack] = server.inbox.acks(code)
    assert ack.cmd_id == "cmd-1"
    assert ack.status is AckStatus.ACCEPTED
    assert ack.reason is None
    assert ack.run_id is not None
    events = server.inbox.distinct_runs(code)
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


def test_device_announces_itself_online_then_its_boot(
    server: Server, make_agent: AgentFactory, code: str
) -> None:
    agent, _relay = make_agent()

    online = server.inbox.wait_state(code, DevicePresence.ONLINE)
    boot = server.inbox.wait_boot(code, 1)

    assert agent.boot_id == 1
    assert online.boot_id == 1
    assert online.fw == "roompay-sim/0.1.0"
    assert online.ts is not None
    assert (boot.fw, boot.active_run, boot.unsent_results) == ("roompay-sim/0.1.0", None, 0)


def test_boot_id_rises_with_every_start_on_the_same_journal(
    server: Server, make_agent: AgentFactory, code: str, tmp_path: Path
) -> None:
    first, _relay = make_agent(journal_path=tmp_path / "journal.db")
    first.stop()

    second, _relay = make_agent(journal_path=tmp_path / "journal.db")

    assert (first.boot_id, second.boot_id) == (1, 2)
    assert server.inbox.wait_boot(code, 2).boot_id == 2


def test_device_sends_heartbeats(server: Server, make_agent: AgentFactory, code: str) -> None:
    make_agent(heartbeat_s=0.05)

    received = server.inbox.wait_for(
        lambda messages: next((m for m in messages if m.parsed.name is EventName.HB), None)
    )

    beat = decode(Heartbeat, received.payload)
    assert beat.relay_on is False
    assert beat.run_id is None


# --- commands the device must not run (again) ----------------------------------


def test_same_cmd_id_twice_runs_once_and_answers_duplicate(
    server: Server, make_agent: AgentFactory, code: str, commands: Commands
) -> None:
    _agent, relay = make_agent(time_scale=1000.0, progress_every_s=600.0)
    command = commands.start(duration_s=600)

    server.send(code, command)
    server.send(code, command)
    accepted, duplicate = server.inbox.wait_acks(code, 2)
    server.inbox.wait_run_event(code, RunEventKind.ENDED)

    assert accepted.status is AckStatus.ACCEPTED
    assert duplicate == accepted.model_copy(
        update={"status": AckStatus.DUPLICATE, "ts": duplicate.ts}
    )
    assert [e.event for e in server.inbox.distinct_runs(code)] == [
        RunEventKind.STARTED,
        RunEventKind.ENDED,
    ]
    assert len(relay.on_periods()) == 1


def test_start_while_busy_is_rejected(
    server: Server, make_agent: AgentFactory, code: str, commands: Commands
) -> None:
    # Given a device in the middle of a one-hour run at normal speed
    agent, relay = make_agent()
    server.send(code, commands.start("cmd-a", duration_s=3600))
    server.inbox.wait_run_event(code, RunEventKind.STARTED)

    # When another order's command arrives
    server.send(code, commands.start("cmd-b"))
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
    server: Server, make_agent: AgentFactory, code: str, topics: Topics
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
    make_server: Callable[..., Server], make_agent: AgentFactory, code: str
) -> None:
    agent, _relay = make_agent()

    agent.stop()
    late_server = make_server()

    offline = late_server.inbox.wait_state(code, DevicePresence.OFFLINE)
    assert offline.boot_id == 1
    assert [s.state for s in late_server.inbox.states(code)] == [DevicePresence.OFFLINE]


def test_killed_device_process_leaves_a_lost_will(
    server: Server, endpoint: MqttEndpoint, topics: Topics, code: str, tmp_path: Path
) -> None:
    with device_process(endpoint, topics, code, tmp_path / "journal.db") as device:
        server.inbox.wait_state(code, DevicePresence.ONLINE, timeout_s=SPAWN_WAIT_S)

        device.kill()
        device.wait(WAIT_S)

        lost = server.inbox.wait_state(code, DevicePresence.LOST)
        assert lost == StateMessage(state=DevicePresence.LOST, boot_id=1)


def test_device_process_runs_a_command_and_stops_on_sigterm(
    server: Server,
    endpoint: MqttEndpoint,
    topics: Topics,
    code: str,
    commands: Commands,
    tmp_path: Path,
) -> None:
    with device_process(endpoint, topics, code, tmp_path / "journal.db") as device:
        server.inbox.wait_state(code, DevicePresence.ONLINE, timeout_s=SPAWN_WAIT_S)

        server.send(code, commands.start(duration_s=900))
        ended = server.inbox.wait_run_event(code, RunEventKind.ENDED)
        device.send_signal(signal.SIGTERM)
        _out, err = device.communicate(timeout=WAIT_S)

        assert (ended.reason, ended.actual_run_s) == (EndReason.COMPLETED, 900)
        assert device.returncode == 0
        assert "Traceback" not in err
        server.inbox.wait_state(code, DevicePresence.OFFLINE)


@contextmanager
def device_process(
    endpoint: MqttEndpoint, topics: Topics, code: str, journal: Path
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
        "--journal",
        str(journal),
        "--key-hex",
        key_for(code).hex(),
        "--key-id",
        "k1",
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

"""What the fleet simulator found under load: the server's link must keep commands moving.

The simulator (80 appliances, faults, PostgreSQL and Mosquitto) saw most paid orders
never run: the server handled each device message, a database transaction, on
paho's network thread. While it did, nothing was read or written on the socket, so
start commands waited behind the backlog of device messages and the broker's
PUBACKs; paho's window of 20 unacknowledged messages stayed full, its queue grew
into the thousands, and starts missed their deadline. The device messages now wait
for handler threads, and each copy of a message still waiting is handled once.
"""

# The shared fixtures are imported by name and requested as parameters, which
# pyflakes reads as redefinitions.
# ruff: noqa: F811

import secrets
import threading
from collections.abc import Iterator

import pytest

from roompay.iot.link import REPEAT_WINDOW_S, MqttLink
from roompay.protocol.messages import AckStatus, CommandAck, decode
from roompay.protocol.mqtt_url import MqttEndpoint
from roompay.protocol.topics import EventName, ParsedTopic, Topics
from tests.functional.device_harness import (  # noqa: F401 (fixtures, requested by name)
    WAIT_S,
    AgentFactory,
    Commands,
    code,
    commands,
    endpoint,
    make_agent,
    topics,
)
from tests.support.waiting import wait_for


class StuckDatabase:
    """A device-message handler that hangs on its first message until released, as a
    database does when a transaction waits for a lock."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.handled: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def __call__(self, topic: str, _parsed: ParsedTopic, payload: bytes) -> None:
        self.entered.set()
        if not self.release.wait(WAIT_S * 3):
            raise RuntimeError("never released")
        with self._lock:
            self.handled.append((topic, payload))

    def wait_handled(self, count: int) -> list[tuple[str, bytes]]:
        def enough() -> list[tuple[str, bytes]] | None:
            with self._lock:
                return list(self.handled) if len(self.handled) >= count else None

        return wait_for(enough, WAIT_S, f"{count} handled messages")


@pytest.fixture
def stuck() -> Iterator[StuckDatabase]:
    handler = StuckDatabase()
    yield handler
    handler.release.set()


@pytest.fixture
def link(endpoint: MqttEndpoint, topics: Topics, stuck: StuckDatabase) -> Iterator[MqttLink]:
    server = MqttLink(endpoint, topics, f"roompay-server-{secrets.token_hex(4)}", stuck)
    server.start(timeout_s=WAIT_S)
    yield server
    stuck.release.set()
    server.stop()


def test_a_start_reaches_the_appliance_while_the_server_is_stuck_on_a_device_message(
    link: MqttLink,
    stuck: StuckDatabase,
    make_agent: AgentFactory,
    commands: Commands,
    code: str,
    topics: Topics,
) -> None:
    # Given a server whose handling of device messages hangs (the appliance's birth is
    # the first message it gets)
    _agent, relay = make_agent(time_scale=1.0)
    assert stuck.entered.wait(WAIT_S)

    # When it sends a start command meanwhile
    command = commands.start("load-1", duration_s=600)
    link.publish_start(code, command)

    # Then the appliance gets it and switches on while the handler is still stuck
    relay.wait_switches(1)
    assert relay.is_on is True
    assert not stuck.release.is_set()

    # And once the handler frees up, the appliance's acceptance is handled too
    stuck.release.set()
    ack_topic = topics.event(code, EventName.ACK)
    acks = wait_for(
        lambda: [decode(CommandAck, p) for t, p in list(stuck.handled) if t == ack_topic],
        WAIT_S,
        "the acceptance handled",
    )
    assert [(a.cmd_id, a.status) for a in acks] == [("load-1", AckStatus.ACCEPTED)]


def test_copies_of_a_device_message_still_waiting_are_handled_once_and_in_order(
    link: MqttLink, stuck: StuckDatabase, topics: Topics
) -> None:
    # Given a server stuck on a device's first message
    device = f"dev-{secrets.token_hex(4)}"
    run_topic = topics.event(device, EventName.RUN)
    link.publish(run_topic, b"first", qos=1)
    assert stuck.entered.wait(WAIT_S)

    # When the device re-sends the same event three times, then another one
    for _ in range(3):
        link.publish(run_topic, b"second", qos=1)
    link.publish(run_topic, b"third", qos=1)
    wait_for(
        lambda: link.inbox.waiting >= 2 and link.inbox.dropped_copies >= 2,
        WAIT_S,
        "the copies",
    )

    # Then, once the handler frees up, each distinct message is handled once, in order
    stuck.release.set()
    handled = stuck.wait_handled(3)
    assert handled == [(run_topic, b"first"), (run_topic, b"second"), (run_topic, b"third")]
    assert link.inbox.dropped_copies == 2


def test_an_answer_to_a_command_is_handled_before_run_events_waiting_ahead_of_it(
    link: MqttLink, stuck: StuckDatabase, topics: Topics
) -> None:
    # Given a server stuck on a device's first message, with a run event waiting
    device = f"dev-{secrets.token_hex(4)}"
    run_topic = topics.event(device, EventName.RUN)
    ack_topic = topics.event(device, EventName.ACK)
    link.publish(run_topic, b"first", qos=1)
    assert stuck.entered.wait(WAIT_S)
    link.publish(run_topic, b"progress", qos=1)

    # When the answer to a start command arrives after it
    link.publish(ack_topic, b"accepted", qos=1)
    wait_for(lambda: link.inbox.waiting >= 2, WAIT_S, "the messages")

    # Then the answer is handled first: the start's deadline runs while it waits
    stuck.release.set()
    handled = stuck.wait_handled(3)
    assert handled == [(run_topic, b"first"), (ack_topic, b"accepted"), (run_topic, b"progress")]


@pytest.mark.parametrize("threads", [8, 0], ids=["handler-threads", "inline"])
def test_a_copy_of_a_device_message_handled_moments_ago_is_dropped(
    endpoint: MqttEndpoint, stuck: StuckDatabase, topics: Topics, threads: int
) -> None:
    # Given a run event a server with the runtime's repeat window has just handled, on
    # handler threads or (as the runtime does) on the link's network thread
    stuck.release.set()
    link = MqttLink(
        endpoint,
        topics,
        f"roompay-server-{secrets.token_hex(4)}",
        stuck,
        handler_threads=threads,
        repeat_window_s=REPEAT_WINDOW_S,
    )
    link.start(timeout_s=WAIT_S)
    try:
        _resend_before_the_run_ack(link, stuck, topics)
    finally:
        link.stop()


def _resend_before_the_run_ack(link: MqttLink, stuck: StuckDatabase, topics: Topics) -> None:
    device = f"dev-{secrets.token_hex(4)}"
    run_topic = topics.event(device, EventName.RUN)
    link.publish(run_topic, b"started", qos=1)
    stuck.wait_handled(1)

    # When the device re-sends it before our run ack reached it, then sends the next one
    link.publish(run_topic, b"started", qos=1)
    link.publish(run_topic, b"ended", qos=1)

    # Then the copy costs nothing: only the new event is handled
    assert stuck.wait_handled(2) == [(run_topic, b"started"), (run_topic, b"ended")]
    assert link.inbox.dropped_copies == 1

"""The server's side of the device link: commands out, events and state in.

paho's own network thread (`loop_start`) only moves packets: a handler that writes
to the database never runs there. It would hold back every PUBACK the broker sends
for our own publishes, and with paho's window of 20 unacknowledged messages full,
start commands would wait in paho's queue behind run acks until their deadline
passed (the fleet simulator's collapse under load). Such a handler gets handler
threads (`Inbox`); one that only decodes and hands the message on, as the server's
does, runs on the network thread itself (`handler_threads=0`): one thread hop less
for every device message.
paho reconnects with backoff by itself; every (re)connect subscribes again, so a
broker restart costs no subscriptions even with a clean session.
"""

import logging
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from roompay.iot.client import StartupLatch, bring_up, new_client, shut_down
from roompay.protocol.errors import InvalidTopicError, LinkError
from roompay.protocol.messages import RunAck, StartCommand, StopCommand, encode
from roompay.protocol.mqtt_url import MqttEndpoint
from roompay.protocol.topics import CommandName, ParsedTopic, Topics

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, ParsedTopic, bytes], None]
"""Called on a handler thread with (topic, parsed topic, payload) for each device message."""

HANDLER_THREADS = 8
REPEAT_WINDOW_S = 10.0
"""The server's window: a message equal to one handled less than this long ago is a repeat."""


class Inbox:
    """Device messages waiting for the handler: in arrival order per device, each copy once.

    A device's messages always go to the same thread, so they are handled in the
    order they came, except that answers to commands (`evt/ack`) go before the
    rest: a start's deadline runs while its answer waits, and a backlog of run
    events (which the device keeps re-sending anyway) must not make it expire.
    Different devices are handled side by side. A message equal to one still
    waiting or handled less than `repeat_window_s` ago (same topic, same bytes: a
    device re-sending its outbox before our run ack reached it, a broker
    redelivering) is dropped, so a backlog cannot feed on itself. A device whose
    run ack was lost sends the event again after the window and gets it then.
    """

    def __init__(
        self, handler: MessageHandler, threads: int = HANDLER_THREADS, repeat_window_s: float = 0.0
    ) -> None:
        """With `threads=0` the handler runs on the caller's thread, at once (for a handler
        that returns at once); copies are dropped all the same."""
        if threads < 0 or repeat_window_s < 0:
            raise ValueError("threads and the repeat window are not negative")
        self._handler = handler
        self._inline = threads == 0
        self._lanes = [_Lane(handler, index, repeat_window_s) for index in range(max(threads, 1))]

    @property
    def waiting(self) -> int:
        """How many messages wait for the handler now."""
        return sum(lane.waiting for lane in self._lanes)

    @property
    def dropped_copies(self) -> int:
        """How many copies of a waiting message were dropped so far."""
        return sum(lane.dropped_copies for lane in self._lanes)

    def start(self) -> None:
        """Start the handler threads (none if the handler runs inline)."""
        if self._inline:
            return
        for lane in self._lanes:
            lane.start()

    def put(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        """Queue a message for its device's thread and return at once; or, inline, handle
        it now."""
        lane = self._lanes[zlib.crc32(parsed.code.encode()) % len(self._lanes)]
        if self._inline:
            lane.handle_now(topic, parsed, payload)
        else:
            lane.put(topic, parsed, payload)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Handle what is already queued, then stop the threads."""
        for lane in self._lanes:
            lane.stop(timeout_s)


class _Lane:
    """One handler thread and its queue."""

    def __init__(self, handler: MessageHandler, index: int, repeat_window_s: float) -> None:
        self._handler = handler
        self._index = index
        self._repeat_window_s = repeat_window_s
        self._queue: deque[tuple[str, ParsedTopic, bytes]] = deque()
        self._answers: deque[tuple[str, ParsedTopic, bytes]] = deque()
        self._queued: set[tuple[str, bytes]] = set()
        self._recent: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.dropped_copies = 0

    @property
    def waiting(self) -> int:
        with self._ready:
            return len(self._queue) + len(self._answers)

    def start(self) -> None:
        with self._ready:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, name=f"device-messages-{self._index}", daemon=True
            )
            self._thread.start()

    def put(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        with self._ready:
            if not self._admit((topic, payload)):
                return
            (self._answers if parsed.is_answer else self._queue).append((topic, parsed, payload))
            self._ready.notify()

    def handle_now(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        with self._ready:
            if not self._admit((topic, payload)):
                return
        self._handle(topic, parsed, payload)

    def _admit(self, key: tuple[str, bytes]) -> bool:
        """Mark a message as taken, unless it is a copy (then count it). Lock held."""
        now = time.monotonic()
        while self._recent and next(iter(self._recent.values())) < now - self._repeat_window_s:
            self._recent.popitem(last=False)
        if key in self._queued or key in self._recent:
            self.dropped_copies += 1
            return False
        self._queued.add(key)
        return True

    def stop(self, timeout_s: float) -> None:
        with self._ready:
            self._stopping = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._answers and not self._stopping:
                    self._ready.wait()
                if not self._queue and not self._answers:
                    return
                queue = self._answers or self._queue
                topic, parsed, payload = queue.popleft()
                # Still marked while handled: a copy arriving meanwhile adds nothing.
            self._handle(topic, parsed, payload)

    def _handle(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        try:
            self._handler(topic, parsed, payload)
        except Exception:
            # The handler is application code; the thread must survive whatever it does.
            log.exception("message handler failed on %s", topic)
        finally:
            with self._ready:
                self._queued.discard((topic, payload))
                if self._repeat_window_s > 0:
                    self._recent[(topic, payload)] = time.monotonic()
                    self._recent.move_to_end((topic, payload))


class MqttLink:
    """Publishes commands to devices and hands every device event to one callback."""

    def __init__(
        self,
        endpoint: MqttEndpoint,
        topics: Topics,
        client_id: str,
        on_message: MessageHandler,
        *,
        keepalive_s: int = 30,
        clean_session: bool = True,
        handler_threads: int = HANDLER_THREADS,
        repeat_window_s: float = 0.0,
    ) -> None:
        self._endpoint = endpoint
        self._topics = topics
        self._inbox = Inbox(on_message, handler_threads, repeat_window_s)
        # The copy of each start command last handed to paho, by command id.
        self._starts: dict[str, mqtt.MQTTMessageInfo] = {}
        self._keepalive_s = keepalive_s
        self._latch = StartupLatch()
        self._subscribe_mid: int | None = None
        self._started = False
        self._lock = threading.Lock()
        self._client = new_client(endpoint, client_id, clean_session=clean_session)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        """Tell whether the client holds a live connection to the broker right now."""
        return self._client.is_connected()

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; return once both are acknowledged, or raise ConnectError."""
        with self._lock:
            if self._started:
                raise LinkError("MQTT link already started")
            # A fresh latch per start, so a restart waits for its own CONNACK and SUBACK.
            self._latch = StartupLatch()
            self._inbox.start()
            try:
                bring_up(
                    self._client,
                    self._endpoint,
                    self._latch,
                    keepalive_s=self._keepalive_s,
                    timeout_s=timeout_s,
                )
            except LinkError:
                self._inbox.stop()
                raise
            self._started = True

    @property
    def inbox(self) -> Inbox:
        """The device messages waiting for the handler."""
        return self._inbox

    def publish_start(self, code: str, cmd: StartCommand) -> None:
        """Send a start command to device `code` at QoS 1, never retained.

        A re-send while the previous copy of the same command is still in paho's
        queue (not yet acknowledged by the broker) is skipped: it would only wait
        behind that copy and reach the device as a duplicate.
        """
        with self._lock:
            earlier = self._starts.get(cmd.cmd_id)
            if earlier is not None and not earlier.is_published():
                return
            for cmd_id in [key for key, info in self._starts.items() if info.is_published()]:
                del self._starts[cmd_id]
            topic = self._topics.command(code, CommandName.START)
            self._starts[cmd.cmd_id] = self.publish(topic, encode(cmd), qos=1)

    def publish_stop(self, code: str, cmd: StopCommand) -> None:
        """Send a stop command to device `code` at QoS 1, never retained."""
        self.publish(self._topics.command(code, CommandName.STOP), encode(cmd), qos=1)

    def publish_run_ack(self, code: str, ack: RunAck) -> None:
        """Tell device `code` that its run events up to `ack.seq` are stored (QoS 1)."""
        self.publish(self._topics.command(code, CommandName.RUN_ACK), encode(ack), qos=1)

    def publish(
        self, topic: str, payload: bytes, qos: int, *, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Queue a message; with QoS > 0 paho keeps it across a reconnect. Thread-safe."""
        if not self._started:
            raise LinkError("MQTT link is not started")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            return info
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            log.info("broker unreachable; %s queued until reconnect", topic)
            return info
        raise LinkError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread; safe to call twice."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            shut_down(self._client)
            self._inbox.stop()

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Any,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            self._latch.fail(f"broker refused the connection: {reason_code}")
            return
        patterns = [(pattern, 1) for pattern in self._topics.server_subscriptions()]
        _rc, self._subscribe_mid = client.subscribe(patterns)
        log.info("connected to %s", self._endpoint.url)

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reason_codes: Sequence[ReasonCode],
        _properties: Any,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("broker refused the subscriptions: %s", refused)
            self._latch.fail(f"broker refused the subscriptions: {refused}")
            return
        self._latch.succeed()

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        _properties: Any,
    ) -> None:
        if self._started:
            log.warning("lost the broker (%s); paho reconnects with backoff", reason_code)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            parsed = self._topics.parse(msg.topic)
        except InvalidTopicError as exc:
            log.warning("dropped a message: %s", exc)
            return
        # Handled here only if the handler returns at once (see the module's docstring).
        self._inbox.put(msg.topic, parsed, bytes(msg.payload))

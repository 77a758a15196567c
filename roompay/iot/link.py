"""The server's side of the device link: commands out, events and state in.

Runs on paho's own network thread (`loop_start`). paho reconnects with backoff
by itself; every (re)connect subscribes again, so a broker restart costs no
subscriptions even with a clean session.
"""

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from roompay.iot.client import StartupLatch, bring_up, new_client, shut_down
from roompay.protocol.errors import InvalidTopicError, LinkError
from roompay.protocol.messages import RunAck, StartCommand, encode
from roompay.protocol.mqtt_url import MqttEndpoint
from roompay.protocol.topics import CommandName, ParsedTopic, Topics

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, ParsedTopic, bytes], None]
"""Called on paho's thread with (topic, parsed topic, payload) for each device message."""


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
    ) -> None:
        self._endpoint = endpoint
        self._topics = topics
        self._handler = on_message
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
            bring_up(
                self._client,
                self._endpoint,
                self._latch,
                keepalive_s=self._keepalive_s,
                timeout_s=timeout_s,
            )
            self._started = True

    def publish_start(self, code: str, cmd: StartCommand) -> None:
        """Send a start command to device `code` at QoS 1, never retained."""
        self.publish(self._topics.command(code, CommandName.START), encode(cmd), qos=1)

    def publish_run_ack(self, code: str, ack: RunAck) -> None:
        """Tell device `code` that its run events up to `ack.seq` are stored (QoS 1)."""
        self.publish(self._topics.command(code, CommandName.RUN_ACK), encode(ack), qos=1)

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """Queue a message; with QoS > 0 paho keeps it across a reconnect. Thread-safe."""
        if not self._started:
            raise LinkError("MQTT link is not started")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            return
        if info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:
            log.info("broker unreachable; %s queued until reconnect", topic)
            return
        raise LinkError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")

    def stop(self) -> None:
        """Disconnect cleanly and stop the network thread; safe to call twice."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            shut_down(self._client)

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
        try:
            self._handler(msg.topic, parsed, bytes(msg.payload))
        except Exception:
            # The handler is application code; paho's thread must survive whatever it does.
            log.exception("message handler failed on %s", msg.topic)

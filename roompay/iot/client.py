"""How every MQTT client of the project is built and brought up, on paho-mqtt 2.x.

Shared by the server's link and the device agent so that both connect the same
way: MQTT 3.1.1 (the embedded broker speaks nothing newer), TCP_NODELAY on every
socket, and start-up that waits for the SUBACK so no message is missed.
"""

import logging
import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from roompay.protocol.errors import ConnectError
from roompay.protocol.mqtt_url import MqttEndpoint

log = logging.getLogger(__name__)


def new_client(endpoint: MqttEndpoint, client_id: str, *, clean_session: bool) -> mqtt.Client:
    """Build an unconnected MQTT 3.1.1 client for `endpoint`."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
    )
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    client.on_socket_open = _set_no_delay
    return client


def _set_no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Nagle holds back small QoS 1 packets waiting for an ACK: 40-90 ms per round trip.
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class StartupLatch:
    """Lets a starting thread wait until the network thread says the client is ready."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._failure: str | None = None

    def succeed(self) -> None:
        """Release the waiter: connected and subscribed."""
        self._event.set()

    def fail(self, reason: str) -> None:
        """Release the waiter with an error."""
        self._failure = reason
        self._event.set()

    def wait(self, timeout_s: float, what: str) -> None:
        """Block until released, or raise ConnectError on failure or timeout."""
        if not self._event.wait(timeout_s):
            raise ConnectError(f"{what}: no CONNACK/SUBACK within {timeout_s} s")
        if self._failure is not None:
            raise ConnectError(f"{what}: {self._failure}")


def bring_up(
    client: mqtt.Client,
    endpoint: MqttEndpoint,
    latch: StartupLatch,
    *,
    keepalive_s: int,
    timeout_s: float,
) -> None:
    """Connect, start paho's network thread and wait for the latch; undo everything on failure."""
    what = f"MQTT broker {endpoint.url}"
    client.connect_timeout = timeout_s
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=keepalive_s)
    except OSError as exc:
        raise ConnectError(f"{what}: cannot connect: {exc}") from exc
    client.loop_start()
    try:
        latch.wait(timeout_s, what)
    except ConnectError:
        shut_down(client)
        raise


def shut_down(client: mqtt.Client) -> None:
    """Send DISCONNECT (so no last will fires) and stop paho's network thread."""
    client.disconnect()
    client.loop_stop()

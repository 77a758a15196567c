"""A bare MQTT 3.1.1 client on asyncio streams, for thousands of connections per process.

paho's `select()` loop stops at file descriptor 1023 and costs a thread per client;
the benchmark needs 10,000 appliances and a baseline that does as little as
possible. This client speaks just what they need: CONNECT (with a last will),
SUBSCRIBE, PUBLISH at QoS 0/1 (PUBACKs are sent for incoming QoS 1 messages and
not awaited for outgoing ones), PINGREQ and DISCONNECT. TCP_NODELAY is set, as on
every MQTT socket of the project.
"""

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0

MessageCallback = Callable[[str, bytes], None]
"""Called on the event loop with (topic, payload) for every PUBLISH received."""


class MqttError(Exception):
    """The broker refused us or the connection broke."""


@dataclass(frozen=True, slots=True)
class Will:
    """A last will: published by the broker if the connection drops without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _length(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(kind: int, body: bytes) -> bytes:
    """Frame one control packet."""
    return bytes([kind]) + _length(len(body)) + body


def connect_packet(client_id: str, keepalive_s: int, clean: bool, will: Will | None) -> bytes:
    """CONNECT for MQTT 3.1.1."""
    flags = 0x02 if clean else 0
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += _string(will.topic) + _string(will.payload)
    header = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s)
    return packet(CONNECT, header + payload)


class MiniMqtt:
    """One MQTT connection on the running event loop."""

    def __init__(self, client_id: str, on_message: MessageCallback | None = None) -> None:
        self.client_id = client_id
        self._on_message = on_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._connack: asyncio.Future[int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.received = 0
        self.closed = asyncio.Event()
        self.error: str | None = None

    async def connect(
        self,
        host: str,
        port: int,
        *,
        keepalive_s: int = 0,
        clean: bool = True,
        will: Will | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """Open the connection and wait for a successful CONNACK."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._task = loop.create_task(self._read_loop())
        writer.write(connect_packet(self.client_id, keepalive_s, clean, will))
        code = await asyncio.wait_for(self._connack, timeout_s)
        if code != 0:
            raise MqttError(f"{self.client_id}: CONNACK return code {code}")

    async def subscribe(self, topics: list[str], qos: int = 1, timeout_s: float = 30.0) -> None:
        """Subscribe and wait for the SUBACK; a refused filter raises."""
        pid = self._packet_id()
        body = struct.pack("!H", pid) + b"".join(_string(t) + bytes([qos]) for t in topics)
        waiter = asyncio.get_running_loop().create_future()
        self._pending[pid] = waiter
        self._write(packet(SUBSCRIBE, body))
        granted = await asyncio.wait_for(waiter, timeout_s)
        if any(code == 0x80 for code in granted):
            raise MqttError(f"{self.client_id}: subscription refused")

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Queue a PUBLISH; at QoS 1 the broker's PUBACK is read and dropped."""
        first = PUBLISH | (qos << 1) | (1 if retain else 0)
        body = _string(topic)
        if qos:
            body += struct.pack("!H", self._packet_id())
        self._write(bytes([first]) + _length(len(body) + len(payload)) + body + payload)

    def ping(self) -> None:
        """Send PINGREQ."""
        self._write(packet(PINGREQ, b""))

    async def disconnect(self) -> None:
        """Send DISCONNECT (no last will) and close."""
        if self._writer is None:
            return
        if not self._writer.is_closing():
            self._write(packet(DISCONNECT, b""))
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
        self.closed.set()

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    def _write(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise MqttError(f"{self.client_id}: not connected")
        self._writer.write(data)

    async def _read_loop(self) -> None:
        reader = self._reader
        assert reader is not None
        try:
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    digit = (await reader.readexactly(1))[0]
                    length |= (digit & 0x7F) << shift
                    shift += 7
                    if not digit & 0x80:
                        break
                body = await reader.readexactly(length) if length else b""
                self._dispatch(first, body)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self.error = f"connection lost: {exc!r}"
        finally:
            self.closed.set()
            if self._connack is not None and not self._connack.done():
                self._connack.set_exception(MqttError(f"{self.client_id}: closed before CONNACK"))

    def _dispatch(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            qos = (first >> 1) & 0x03
            (topic_len,) = struct.unpack_from("!H", body)
            topic = body[2 : 2 + topic_len].decode()
            offset = 2 + topic_len
            if qos:
                self._write(packet(PUBACK, body[offset : offset + 2]))
                offset += 2
            self.received += 1
            if self._on_message is not None:
                self._on_message(topic, body[offset:])
        elif kind == CONNACK and self._connack is not None and not self._connack.done():
            self._connack.set_result(body[1])
        elif kind == SUBACK:
            (pid,) = struct.unpack_from("!H", body)
            waiter = self._pending.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(body[2:])

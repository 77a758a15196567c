"""An MQTT broker inside the process, for development, demos and tests.

It speaks MQTT 3.1.1 only (an MQTT 5 CONNECT hangs), so every client in the
project connects with MQTTv311. It binds loopback addresses only: it has no
password file and no ACLs, so it must never face a network.
"""

import asyncio
import contextlib
import ipaddress
import logging
import threading
from functools import partial
from types import TracebackType
from typing import Any, Self

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker

from roompay.protocol.mqtt_url import MqttEndpoint

log = logging.getLogger(__name__)

_LISTENER = "default"


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not start or stop."""


def _require_loopback(host: str) -> None:
    """Raise ValueError unless `host` is a loopback IP address literal."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"embedded broker needs a loopback IP address such as 127.0.0.1, not {host!r}"
        ) from None
    if not address.is_loopback:
        raise ValueError(f"embedded broker refuses to bind non-loopback address {host!r}")


class EmbeddedBroker:
    """Runs an anonymous MQTT 3.1.1 broker on a loopback port in its own thread and event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        _require_loopback(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """Return the port the broker listens on; known once started."""
        if self._port is None:
            raise EmbeddedBrokerError("embedded broker is not started")
        return self._port

    @property
    def url(self) -> str:
        """Return the broker's address as an mqtt:// URL."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self.port}"

    @property
    def endpoint(self) -> MqttEndpoint:
        """Return the broker's address for clients."""
        return MqttEndpoint(host=self._host, port=self.port)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; return once the port accepts connections."""
        if self._thread is not None:
            raise EmbeddedBrokerError("embedded broker already started")
        self._thread = threading.Thread(target=self._run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop(timeout_s)
            raise EmbeddedBrokerError(f"embedded broker did not start within {timeout_s} s")
        if self._failure is not None:
            self._thread.join(timeout_s)
            self._thread = None
            raise EmbeddedBrokerError(f"embedded broker failed to start: {self._failure}") from (
                self._failure
            )
        log.info("embedded MQTT broker listening on %s", self.url)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close every connection, shut the broker down and join its thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed by itself
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout_s)
        if thread.is_alive():
            raise EmbeddedBrokerError(f"embedded broker did not stop within {timeout_s} s")
        self._thread = None
        self._port = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._failure = exc
            log.exception("embedded MQTT broker crashed")
        finally:
            self._ready.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = None

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        broker = Broker(self._config(), loop=asyncio.get_running_loop())
        connections: set[asyncio.Task[Any]] = set()
        # We own the listening socket and hand each stream to the broker, so port 0
        # yields the real port without a pick-then-bind race. Binding comes first so
        # that a taken port fails before there is a broker to shut down.
        server = await asyncio.start_server(
            partial(self._accept, broker, connections),
            self._host,
            self._requested_port,
            start_serving=False,
        )
        try:
            await broker.start()
            try:
                await server.start_serving()
                self._port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await self._stopping.wait()
            finally:
                server.close()
                await broker.shutdown()
                for task in list(connections):
                    task.cancel()
                await asyncio.gather(*connections, return_exceptions=True)
        finally:
            server.close()
            await server.wait_closed()

    @staticmethod
    async def _accept(
        broker: Broker,
        connections: set[asyncio.Task[Any]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), _LISTENER
            )
        finally:
            connections.discard(task)
            writer.close()

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {
                _LISTENER: {"type": "external", "bind": f"{self._host}:{self._requested_port}"},
            },
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }

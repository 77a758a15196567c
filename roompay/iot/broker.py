"""An MQTT broker inside the process, for development, demos and tests.

It speaks MQTT 3.1.1 only (an MQTT 5 CONNECT hangs), so every client in the
project connects with MQTTv311. It binds loopback addresses only: even with
users and ACLs it falls short of Mosquitto, so it must never face a network.

Without `users` it is anonymous and open. With `users` (username -> password hash in
Mosquitto's `$7$` format, as stored on the device rows) it refuses anonymous logins
and wrong passwords, and a device user (every user but `backend_user`) must connect
with client id = username. With `acl_root` as well, amqtt's ACL plugin gets one entry
per device (amqtt has no `%u` patterns): a device may subscribe only under
`{root}/dev/{user}/cmd/#` and publish only to `{root}/dev/{user}/evt/#` and
`{root}/dev/{user}/state`; the backend may do anything under `{root}/#`.

Gaps against Mosquitto 2.0 (docs/protocol.md, "Broker security"), amqtt 0.12.1:

- A refused SUBSCRIBE gets SUBACK 0x80 at once; Mosquitto grants it and filters on
  each delivery. Either way nothing is delivered.
- A refused PUBLISH is dropped silently; the connection stays open (as Mosquitto).
- Only the `acl` (subscribe) and `publish_acl` config keys exist; there is no
  receive ACL. Reading is therefore decided at SUBSCRIBE time only.
- amqtt replays retained messages on every CONNECT for every topic filter anyone on
  the broker holds, without an ACL check: a device would get other devices' retained
  `state` because the server subscribes to `+/state`. `_Broker` below closes this by
  replaying only for filters the connecting session itself holds.
- amqtt publishes a last will without any ACL check; our auth plugin refuses a
  CONNECT whose will topic the user may not publish to (Mosquitto does the same).
- No `use_username_as_clientid`: a device whose client id differs from its username
  is refused instead of renamed.
- amqtt handles the client id before it authenticates: a refused CONNECT (no or
  wrong password) that names a connected client's id still disconnects that client,
  and with clean session it also discards that client's stored session and queued
  messages. Anyone who can reach the port can knock a device off.
- amqtt's own password file takes argon2 or bcrypt only; `$7$` hashes are checked by
  `_PasswordHashAuthPlugin` here.
- No persistence: sessions, queued commands and retained `state` die with the process.
"""

import asyncio
import contextlib
import ipaddress
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin

from roompay.iot.credentials import (
    BACKEND_USERNAME,
    CredentialError,
    check_username,
    parse_password_hash,
    verify_password,
)
from roompay.protocol.mqtt_url import MqttEndpoint
from roompay.protocol.topics import Topics

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
    """Runs an MQTT 3.1.1 broker on a loopback port in its own thread and event loop.

    Anonymous unless `users` is given; see the module docstring for what `users` and
    `acl_root` enforce and where that falls short of Mosquitto.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        users: Mapping[str, str] | None = None,
        acl_root: str | None = None,
        *,
        backend_user: str = BACKEND_USERNAME,
    ) -> None:
        _require_loopback(host)
        if not 0 <= port <= 65535:
            raise ValueError(f"invalid port {port}")
        if acl_root is not None and users is None:
            raise ValueError("acl_root needs users: an ACL cannot tell anonymous clients apart")
        self._users = None if users is None else _checked_users(users)
        self._acl = (
            None if acl_root is None or users is None else _acl(users, acl_root, backend_user)
        )
        self._acl_root = acl_root
        self._backend_user = backend_user
        self._broker: _Broker | None = None
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

    def set_users(self, users: Mapping[str, str], timeout_s: float = 10.0) -> None:
        """Replace the users (and their ACL entries) of a running broker with users.

        Takes effect at the next CONNECT, SUBSCRIBE or PUBLISH; connections already
        open stay open, as with Mosquitto's reload. Only a broker started with users
        can change them: an anonymous broker cannot become a closed one.
        """
        if self._users is None:
            raise EmbeddedBrokerError("an anonymous embedded broker cannot take users")
        checked = _checked_users(users)
        acl = None if self._acl_root is None else _acl(checked, self._acl_root, self._backend_user)
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            raise EmbeddedBrokerError("embedded broker is not started")

        async def swap() -> None:
            for plugin in broker.plugins_manager.plugins:
                config = plugin.context.config
                if isinstance(plugin, _PasswordHashAuthPlugin):
                    config.users = dict(checked)
                    config.will_acl = None if acl is None else acl.publish
                elif isinstance(plugin, TopicAccessControlListPlugin) and acl is not None:
                    config.acl = acl.subscribe
                    config.publish_acl = acl.publish

        asyncio.run_coroutine_threadsafe(swap(), loop).result(timeout_s)
        self._users, self._acl = checked, acl
        log.info("embedded MQTT broker now knows %d users", len(checked))

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
        broker = _Broker(self._config(), loop=asyncio.get_running_loop())
        self._broker = broker
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
                # Let the closed transports run their connection_lost callbacks before the
                # loop goes away; otherwise they are finalised later, unclosed.
                for _ in range(3):
                    await asyncio.sleep(0)
        finally:
            self._broker = None
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
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    def _config(self) -> dict[str, Any]:
        plugins: dict[str, Any]
        if self._users is None:
            plugins = {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            }
        else:
            plugins = {
                f"{__name__}._PasswordHashAuthPlugin": {
                    "users": dict(self._users),
                    "free_client_id": [self._backend_user],
                    "will_acl": None if self._acl is None else self._acl.publish,
                },
            }
            if self._acl is not None:
                # Only these two keys load; `subscribe_acl` and `receive_acl` fail to.
                plugins["amqtt.plugins.topic_checking.TopicAccessControlListPlugin"] = {
                    "acl": self._acl.subscribe,
                    "publish_acl": self._acl.publish,
                }
        return {
            "listeners": {
                _LISTENER: {"type": "external", "bind": f"{self._host}:{self._requested_port}"},
            },
            "plugins": plugins,
        }


@dataclass(frozen=True, slots=True)
class _Acl:
    subscribe: dict[str, list[str]]
    publish: dict[str, list[str]]


def _checked_users(users: Mapping[str, str]) -> dict[str, str]:
    """Validate usernames and `$7$` hashes up front, so a typo fails at construction."""
    checked: dict[str, str] = {}
    for username, password_hash in users.items():
        try:
            check_username(username)
            parse_password_hash(password_hash)
        except CredentialError as exc:
            raise ValueError(f"embedded broker user {username!r}: {exc}") from exc
        checked[username] = password_hash
    return checked


def _acl(users: Mapping[str, str], root: str, backend_user: str) -> _Acl:
    """One subscribe and one publish entry per user; amqtt cannot expand `%u`."""
    topics = Topics(root)
    subscribe: dict[str, list[str]] = {}
    publish: dict[str, list[str]] = {}
    for username in users:
        if username == backend_user:
            subscribe[username] = [f"{topics.root}/#"]
            publish[username] = [f"{topics.root}/#"]
        else:
            subscribe[username] = [topics.device_subscription(username)]
            publish[username] = [f"{topics.device(username)}/evt/#", topics.state(username)]
    return _Acl(subscribe, publish)


class _Broker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker without its retained-message leak on CONNECT.

    On every CONNECT amqtt replays retained messages for each topic filter held by
    any session on the broker, with no ACL check. Here a session gets retained
    messages only for the filters it holds itself, as MQTT 3.1.1 §3.3.1.3 intends.
    """

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        holders = self._subscriptions.get(subscription[0], [])
        if not any(holder.client_id == session.client_id for holder, _qos in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class _PasswordHashAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Checks passwords against `$7$` hashes, client id = username, and the will topic."""

    @dataclass
    class Config:
        """Loaded by amqtt from the `plugins` section."""

        users: dict[str, str] = field(default_factory=dict)
        # Users that may connect under any client id (the server's own account).
        free_client_id: list[str] = field(default_factory=list)
        # The publish ACL, applied to the will topic at CONNECT; None when no ACL is set.
        will_acl: dict[str, list[str]] | None = None

    async def authenticate(self, *, session: Any) -> bool:
        config: _PasswordHashAuthPlugin.Config = self.context.config
        username = getattr(session, "username", None)
        if not username:
            log.info("embedded broker refused an anonymous CONNECT")
            return False
        password_hash = config.users.get(username)
        if password_hash is None or not verify_password(session.password or "", password_hash):
            log.info("embedded broker refused %r: bad username or password", username)
            return False
        if username not in config.free_client_id and session.client_id != username:
            log.info("embedded broker refused %r: client id must equal the username", username)
            return False
        if session.will_flag and config.will_acl is not None:
            allowed = config.will_acl.get(username, [])
            topic = session.will_topic or ""
            if not any(TopicAccessControlListPlugin.topic_ac(topic, a) for a in allowed):
                log.info("embedded broker refused %r: will topic %r not allowed", username, topic)
                return False
        return True

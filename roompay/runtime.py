"""The composition root: builds the server's parts from settings and starts/stops them.

Nothing else in the project creates engines, brokers, links or providers.
"""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from roompay.clock import Clock, IdGenerator, RandomIds, SystemClock
from roompay.domain.catalog import Wallet
from roompay.iot.broker import EmbeddedBroker
from roompay.iot.credentials import BACKEND_USERNAME, generate_password, hash_password
from roompay.iot.link import REPEAT_WINDOW_S, MqttLink
from roompay.payments.base import PaymentProvider
from roompay.protocol.messages import RunAck
from roompay.protocol.mqtt_url import MqttEndpoint, parse_mqtt_url
from roompay.protocol.topics import ParsedTopic, Topics
from roompay.services.context import ServiceContext
from roompay.services.devices import (
    flush_heartbeats,
    mark_silent_devices_offline,
    submit_device_message,
)
from roompay.services.dispatch import dispatch_due
from roompay.services.expiry import sweep_unpaid
from roompay.services.metrics import Metrics
from roompay.services.orders import count_by_status
from roompay.services.provisioning import device_accounts
from roompay.services.refunds import process_due_refunds
from roompay.services.webhooks import WebhookOutbox
from roompay.settings import Settings
from roompay.store.db import make_engine, session_factory
from roompay.store.models import Device
from roompay.store.writer import StripedWriter
from roompay.workers import PeriodicWorker

if TYPE_CHECKING:
    from roompay.sandbox.app import Sandbox

log = logging.getLogger(__name__)

# How often the embedded broker's accounts are compared with the database (`roompay
# device add` and `device rotate-password` run in other processes).
BROKER_ACCOUNTS_REFRESH_S = 2.0
WRITER_STRIPES = 4
"""Writers on PostgreSQL: transactions in flight at once (SQLite has one writer)."""


@dataclass
class Runtime:
    """Everything one server process runs, wired together."""

    settings: Settings
    providers: dict[Wallet, PaymentProvider]
    clock: Clock = field(default_factory=SystemClock)
    ids: IdGenerator = field(default_factory=RandomIds)
    sandbox: "Sandbox | None" = None
    broker: EmbeddedBroker | None = None
    engine: Engine = field(init=False)
    ctx: ServiceContext = field(init=False)
    link: MqttLink | None = field(init=False, default=None)
    writer: StripedWriter | None = field(init=False, default=None)
    _writer_engines: list[Engine] = field(init=False, default_factory=list, repr=False)
    _backend_password: str | None = field(init=False, default=None, repr=False)
    _backend_hash: str = field(init=False, default="", repr=False)
    _broker_users: dict[str, str] = field(init=False, default_factory=dict, repr=False)
    _broker_sync: PeriodicWorker | None = field(init=False, default=None, repr=False)
    workers: list[PeriodicWorker] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.engine = make_engine(self.settings.resolved_database_url)
        self.ctx = ServiceContext(
            settings=self.settings,
            sessions=session_factory(self.engine),
            clock=self.clock,
            ids=self.ids,
            providers=self.providers,
            metrics=Metrics(),
        )
        self.ctx.metrics.watch_snapshot(self._orders_by_status, self._devices_online)
        # Installed with the sessions, so any process that records a step queues its webhooks.
        self.webhooks = WebhookOutbox(self.ctx)

    @property
    def topics(self) -> Topics:
        """The MQTT topic layout under the configured root."""
        return Topics(self.settings.mqtt_topic_root)

    def mqtt_endpoint_url(self) -> str:
        """Where the server connects: the configured URL, or the embedded broker.

        The embedded broker is started on first use, closed to anonymous clients: it
        knows every provisioned device's account (username = code, its `$7$` hash) with
        its own-topics ACL, and a `backend` account whose password this process makes
        up and puts in the URL returned here. Devices added or rotated while it runs
        are picked up within `BROKER_ACCOUNTS_REFRESH_S`.
        """
        if self.settings.mqtt_url == "embedded":
            if self.broker is None:
                self._start_embedded_broker()
            assert self.broker is not None
            if self._backend_password is None:  # a broker handed in from outside
                return self.broker.url
            endpoint = self.broker.endpoint
            host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
            return f"mqtt://{BACKEND_USERNAME}:{self._backend_password}@{host}:{endpoint.port}"
        return self.settings.mqtt_url

    def _start_embedded_broker(self) -> None:
        password = generate_password()  # URL-safe: needs no quoting in the URL
        self._backend_hash = hash_password(password)
        self._broker_users = self.broker_accounts()
        self.broker = EmbeddedBroker(users=self._broker_users, acl_root=self.topics.root)
        self.broker.start()
        self._backend_password = password
        self._broker_sync = PeriodicWorker(
            "broker-accounts", self.refresh_broker_accounts, BROKER_ACCOUNTS_REFRESH_S
        )
        self._broker_sync.start()

    def broker_accounts(self) -> dict[str, str]:
        """The embedded broker's users: every provisioned device and this server."""
        with self.ctx.sessions() as session:
            users = {a.username: a.password_hash for a in device_accounts(session).accounts}
        users[BACKEND_USERNAME] = self._backend_hash
        return users

    def refresh_broker_accounts(self) -> bool:
        """Give the embedded broker the accounts in the database; tell whether they changed."""
        if self.broker is None or self._backend_password is None:
            return False
        users = self.broker_accounts()
        if users == self._broker_users:
            return False
        self.broker.set_users(users)
        self._broker_users = users
        return True

    def mqtt_endpoint(self) -> MqttEndpoint:
        """The broker's endpoint."""
        return parse_mqtt_url(self.mqtt_endpoint_url())

    def start(self) -> None:
        """Start the writer, connect to the broker and start dispatching commands."""
        endpoint = self.mqtt_endpoint()
        self.writer = StripedWriter(self._writer_sessions())
        self.writer.start()
        self.ctx.writer = self.writer
        # Device messages are decoded and handed to the writers on the link's network
        # thread: that returns at once, so no handler threads (see `iot.link`).
        self.link = MqttLink(
            endpoint,
            self.topics,
            f"roompay-server-{self.ids.token(4)}",
            self._on_message,
            handler_threads=0,
            repeat_window_s=REPEAT_WINDOW_S,
        )
        self.link.start(timeout_s=10)
        self.ctx.publisher = self.link
        self._start_workers(self.link)
        log.info("server runtime started", extra={"mqtt": f"{endpoint.host}:{endpoint.port}"})

    def _writer_sessions(self) -> list[sessionmaker[Session]]:
        """One session factory per writer: SQLite has one writer on the shared engine;
        each PostgreSQL writer has its own connection, kept (see `StripedWriter`)."""
        if self.engine.dialect.name == "sqlite":
            return [self.ctx.sessions]
        url = self.settings.resolved_database_url
        # Two in the pool: the writer's, and one for a job run on its caller's thread
        # while the writer stops (see `BatchWriter.submit`).
        self._writer_engines = [make_engine(url, pool_size=2) for _ in range(WRITER_STRIPES)]
        return [session_factory(engine) for engine in self._writer_engines]

    def _start_workers(self, link: MqttLink) -> None:
        ctx = self.ctx
        interval = self.settings.maintenance_interval_s
        dispatcher = PeriodicWorker("dispatcher", lambda: dispatch_due(ctx, link), 0.5)
        refunds = PeriodicWorker("refunds", lambda: process_due_refunds(ctx), interval)
        checkouts = PeriodicWorker("checkouts", lambda: sweep_unpaid(ctx), interval)
        presence = PeriodicWorker("presence", lambda: mark_silent_devices_offline(ctx), 10.0)
        heartbeats = PeriodicWorker("heartbeats", lambda: flush_heartbeats(ctx), interval)
        ctx.on_commands_queued = dispatcher.wake
        ctx.on_refunds_queued = refunds.wake
        ctx.on_run_event_stored = lambda code, run_id, seq: link.publish_run_ack(
            code, RunAck(run_id=run_id, seq=seq)
        )
        self.workers = [dispatcher, refunds, checkouts, presence, heartbeats]
        for worker in self.workers:
            worker.start()
        webhooks = PeriodicWorker("webhooks", self.webhooks.deliver_due, interval)
        self.webhooks.on_queued = webhooks.wake
        self.workers.append(webhooks)
        webhooks.start()

    def stop(self) -> None:
        """Stop the workers, disconnect, stop the embedded broker, close the database."""
        for worker in self.workers:
            worker.stop()
        self.ctx.publisher = None
        if self.link is not None:
            self.link.stop()
        # What was heard before the link stopped, while the writers still run.
        try:
            flush_heartbeats(self.ctx)
        except Exception:
            # Heartbeats come again every 30 s; stopping must go on.
            log.exception("the last heartbeats could not be written")
        if self.writer is not None:
            self.ctx.writer = None
            self.writer.stop()
            self.writer = None
        if self._broker_sync is not None:
            self._broker_sync.stop()
            self._broker_sync = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        for provider in self.providers.values():
            provider.close()
        for engine in self._writer_engines:
            engine.dispose()
        self._writer_engines = []
        self.engine.dispose()

    def _on_message(self, _topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        submit_device_message(self.ctx, parsed, payload)

    def _orders_by_status(self) -> dict[str, int]:
        with self.ctx.sessions() as session:
            return count_by_status(session)

    def _devices_online(self) -> int:
        with self.ctx.sessions() as session:
            return int(session.scalar(select(func.count()).where(Device.online.is_(True))) or 0)

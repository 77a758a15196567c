"""The composition root: builds the server's parts from settings and starts/stops them.

Nothing else in the project creates engines, brokers, links or providers.
"""

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from roompay.clock import Clock, IdGenerator, RandomIds, SystemClock
from roompay.domain.catalog import Wallet
from roompay.iot.broker import EmbeddedBroker
from roompay.iot.link import HANDLER_THREADS, MqttLink
from roompay.payments.base import PaymentProvider
from roompay.protocol.messages import RunAck
from roompay.protocol.mqtt_url import MqttEndpoint, parse_mqtt_url
from roompay.protocol.topics import ParsedTopic, Topics
from roompay.services.context import ServiceContext
from roompay.services.devices import handle_device_message, mark_silent_devices_offline
from roompay.services.dispatch import dispatch_due
from roompay.services.expiry import sweep_unpaid
from roompay.services.metrics import Metrics
from roompay.services.orders import count_by_status
from roompay.services.refunds import process_due_refunds
from roompay.services.webhooks import WebhookOutbox
from roompay.settings import Settings
from roompay.store.db import make_engine, session_factory
from roompay.store.models import Device
from roompay.workers import PeriodicWorker

if TYPE_CHECKING:
    from roompay.sandbox.app import Sandbox

log = logging.getLogger(__name__)


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
        """Where the broker is: the embedded one (started on first use), or the configured URL."""
        if self.settings.mqtt_url == "embedded":
            if self.broker is None:
                self.broker = EmbeddedBroker()
                self.broker.start()
            return self.broker.url
        return self.settings.mqtt_url

    def mqtt_endpoint(self) -> MqttEndpoint:
        """The broker's endpoint."""
        return parse_mqtt_url(self.mqtt_endpoint_url())

    def start(self) -> None:
        """Connect to the broker and start dispatching commands."""
        endpoint = self.mqtt_endpoint()
        # SQLite takes one writer at a time: more handler threads would only queue on its lock.
        sqlite = self.settings.resolved_database_url.startswith("sqlite")
        self.link = MqttLink(
            endpoint,
            self.topics,
            f"roompay-server-{self.ids.token(4)}",
            self._on_message,
            handler_threads=1 if sqlite else HANDLER_THREADS,
        )
        self.link.start(timeout_s=10)
        self._start_workers(self.link)
        log.info("server runtime started", extra={"mqtt": f"{endpoint.host}:{endpoint.port}"})

    def _start_workers(self, link: MqttLink) -> None:
        ctx = self.ctx
        interval = self.settings.maintenance_interval_s
        dispatcher = PeriodicWorker("dispatcher", lambda: dispatch_due(ctx, link), 0.5)
        refunds = PeriodicWorker("refunds", lambda: process_due_refunds(ctx), interval)
        checkouts = PeriodicWorker("checkouts", lambda: sweep_unpaid(ctx), interval)
        presence = PeriodicWorker("presence", lambda: mark_silent_devices_offline(ctx), 10.0)
        ctx.on_commands_queued = dispatcher.wake
        ctx.on_refunds_queued = refunds.wake
        ctx.on_run_event_stored = lambda code, run_id, seq: link.publish_run_ack(
            code, RunAck(run_id=run_id, seq=seq)
        )
        self.workers = [dispatcher, refunds, checkouts, presence]
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
        if self.link is not None:
            self.link.stop()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        for provider in self.providers.values():
            provider.close()
        self.engine.dispose()

    def _on_message(self, _topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        handle_device_message(self.ctx, parsed, payload)

    def _orders_by_status(self) -> dict[str, int]:
        with self.ctx.sessions() as session:
            return count_by_status(session)

    def _devices_online(self) -> int:
        with self.ctx.sessions() as session:
            return int(session.scalar(select(func.count()).where(Device.online.is_(True))) or 0)

"""The collaborators every use case gets, built once by the composition root."""

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from roompay.clock import Clock, IdGenerator
from roompay.domain.catalog import Wallet
from roompay.payments.base import PaymentProvider
from roompay.protocol.messages import RunAck, StartCommand, StopCommand
from roompay.services.metrics import Metrics
from roompay.settings import Settings
from roompay.store.writer import Job, StripedWriter, run_alone

T = TypeVar("T")


class CommandPublisher(Protocol):
    """Sends commands to devices (the MQTT link, in production)."""

    @property
    def connected(self) -> bool:
        """Tell whether commands can be sent now."""
        ...

    def publish_start(self, code: str, command: StartCommand) -> None:
        """Send a start command to the device with this code."""
        ...

    def publish_stop(self, code: str, command: StopCommand) -> None:
        """Send a stop command to the device with this code."""
        ...

    def publish_run_ack(self, code: str, ack: RunAck) -> None:
        """Tell the device its run events up to `ack.seq` are stored."""
        ...


class OrderDevices:
    """The appliance of each recent checkout, so a payment finds its writer without a query.

    An order's appliance never changes; only the newest `limit` are kept (a payment
    for an older one looks its appliance up).
    """

    def __init__(self, limit: int = 50_000) -> None:
        self._limit = limit
        self._codes: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, order_id: str, device_code: str) -> None:
        """Note the appliance an order is for."""
        with self._lock:
            self._codes[order_id] = device_code
            if len(self._codes) > self._limit:
                self._codes.popitem(last=False)

    def get(self, order_id: str) -> str | None:
        """The appliance's code, if the order is a recent one."""
        with self._lock:
            return self._codes.get(order_id)


class HeartbeatBuffer:
    """When each appliance's latest heartbeat was heard, until it is written in bulk.

    A heartbeat changes one timestamp and the appliance's presence: a transaction (and
    a durable commit) for each of them took a writer's turn from payments and device
    answers, 333 times a second for 10,000 appliances. They are kept here instead, the
    latest per appliance, and written together every second (`flush_heartbeats`).
    """

    def __init__(self) -> None:
        self._heard: dict[str, datetime] = {}
        self._lock = threading.Lock()

    def note(self, code: str, at: datetime) -> None:
        """Remember that the appliance `code` was heard at `at`."""
        with self._lock:
            self._heard[code] = at

    def take(self) -> dict[str, datetime]:
        """Everything noted since the last take, now forgotten here."""
        with self._lock:
            heard, self._heard = self._heard, {}
        return heard


@dataclass
class ServiceContext:
    """Settings, database sessions, clock, ids and providers for the use cases."""

    settings: Settings
    sessions: sessionmaker[Session]
    clock: Clock
    ids: IdGenerator
    providers: dict[Wallet, PaymentProvider]
    metrics: Metrics
    # Called after a transaction has queued commands or refunds, so workers wake at once.
    on_commands_queued: Callable[[], None] = field(default=lambda: None)
    on_refunds_queued: Callable[[], None] = field(default=lambda: None)
    # Called after a hot-path transaction committed order steps, so the feed reads them now.
    on_steps_written: Callable[[], None] = field(default=lambda: None)
    # Called after a run event is stored, to acknowledge it to the device (code, run, seq).
    on_run_event_stored: Callable[[str, str, int], None] = field(default=lambda *_: None)
    # The hot path's writer (payments, device messages); None: each job alone, inline.
    writer: StripedWriter | None = None
    # Sends a start command as soon as the transaction that wrote it commits; None (or
    # not connected): the dispatcher sends it.
    publisher: CommandPublisher | None = None
    order_devices: OrderDevices = field(default_factory=OrderDevices)
    heartbeats: HeartbeatBuffer = field(default_factory=HeartbeatBuffer)

    def provider(self, wallet: Wallet) -> PaymentProvider:
        """Return the provider for a wallet; raises KeyError if it is not configured."""
        return self.providers[wallet]

    def execute(self, job: Job[T], key: str) -> T:
        """Run a job through the writer, or alone in its own transaction if there is none.

        `key` is the code of the appliance the job is about (see `StripedWriter`).
        """
        if self.writer is not None:
            return self.writer.run(job, key)
        return run_alone(self.sessions, job)

    def by_writer(self, keys: list[str]) -> list[list[str]]:
        """`keys` in groups that one writer takes (all of them in one without a writer)."""
        if self.writer is None:
            return [keys] if keys else []
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(id(self.writer.stripe(key)), []).append(key)
        return list(groups.values())

    def submit(self, job: Job[T], key: str, *, urgent: bool = False) -> "Future[T]":
        """Queue a job for the writer and return at once; the future has its outcome.

        Without a writer the job runs alone now, and the future is already done.
        """
        if self.writer is not None:
            return self.writer.submit(job, key, urgent=urgent)
        done: Future[T] = Future()
        try:
            done.set_result(run_alone(self.sessions, job))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def steps_written(self) -> None:
        """Tell the feed that order steps were committed (whoever listens by then)."""
        self.on_steps_written()

    def publisher_ready(self) -> CommandPublisher | None:
        """The publisher, if a command written now can be sent the moment it commits."""
        publisher = self.publisher
        return publisher if publisher is not None and publisher.connected else None

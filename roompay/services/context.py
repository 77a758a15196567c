"""The collaborators every use case gets, built once by the composition root."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from roompay.clock import Clock, IdGenerator
from roompay.domain.catalog import Wallet
from roompay.payments.base import PaymentProvider
from roompay.protocol.messages import RunAck, StartCommand, StopCommand
from roompay.services.metrics import Metrics
from roompay.settings import Settings
from roompay.store.writer import BatchWriter, Job, run_alone

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
    # Called after a run event is stored, to acknowledge it to the device (code, run, seq).
    on_run_event_stored: Callable[[str, str, int], None] = field(default=lambda *_: None)
    # The hot path's writer (payments, device messages); None: each job alone, inline.
    writer: BatchWriter | None = None
    # Sends a start command as soon as the transaction that wrote it commits; None (or
    # not connected): the dispatcher sends it.
    publisher: CommandPublisher | None = None

    def provider(self, wallet: Wallet) -> PaymentProvider:
        """Return the provider for a wallet; raises KeyError if it is not configured."""
        return self.providers[wallet]

    def execute(self, job: Job[T]) -> T:
        """Run a job through the writer, or alone in its own transaction if there is none."""
        if self.writer is not None:
            return self.writer.run(job)
        return run_alone(self.sessions, job)

    def publisher_ready(self) -> CommandPublisher | None:
        """The publisher, if a command written now can be sent the moment it commits."""
        publisher = self.publisher
        return publisher if publisher is not None and publisher.connected else None

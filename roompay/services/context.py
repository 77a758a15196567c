"""The collaborators every use case gets, built once by the composition root."""

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from roompay.clock import Clock, IdGenerator
from roompay.domain.catalog import Wallet
from roompay.payments.base import PaymentProvider
from roompay.services.metrics import Metrics
from roompay.settings import Settings


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

    def provider(self, wallet: Wallet) -> PaymentProvider:
        """Return the provider for a wallet; raises KeyError if it is not configured."""
        return self.providers[wallet]

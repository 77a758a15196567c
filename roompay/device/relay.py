"""The switch that powers the appliance."""

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class Relay(Protocol):
    """Turns the appliance's power on and off."""

    def on(self) -> None:
        """Close the relay: the appliance runs."""

    def off(self) -> None:
        """Open the relay: the appliance stops."""

    @property
    def is_on(self) -> bool:
        """Tell whether the relay is closed."""


@dataclass(frozen=True, slots=True)
class Switch:
    """One change of the relay, on the monotonic clock."""

    on: bool
    at: float


class SimulatedRelay:
    """A relay in memory that records every change, for tests and the device simulator."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._switches: list[Switch] = []

    def on(self) -> None:
        """Close the relay; closing a closed relay records nothing."""
        self._switch(True)

    def off(self) -> None:
        """Open the relay; opening an open relay records nothing."""
        self._switch(False)

    @property
    def is_on(self) -> bool:
        """Tell whether the relay is closed."""
        with self._lock:
            return bool(self._switches) and self._switches[-1].on

    @property
    def switches(self) -> list[Switch]:
        """Return every recorded change, oldest first."""
        with self._lock:
            return list(self._switches)

    def on_periods(self) -> list[float]:
        """Return how long, in wall seconds, each completed on-period lasted."""
        switches = self.switches
        return [off.at - on.at for on, off in itertools.pairwise(switches) if on.on and not off.on]

    def _switch(self, on: bool) -> None:
        with self._lock:
            if (bool(self._switches) and self._switches[-1].on) == on:
                return
            self._switches.append(Switch(on=on, at=self._monotonic()))
        log.info("relay %s", "on" if on else "off")

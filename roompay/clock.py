"""Time and identifiers, injected everywhere so that tests can drive them."""

import secrets
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Tells the current time as an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class OffsetClock:
    """The wall clock shifted by an offset that only grows: time travel for simulations.

    Thread-safe enough for its purpose: `advance` replaces one float.
    """

    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._offset

    def advance(self, seconds: float) -> None:
        """Jump forward in time."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._offset += timedelta(seconds=seconds)


class IdGenerator(Protocol):
    """Makes unguessable identifiers."""

    def order_id(self) -> str: ...

    def token(self, nbytes: int = 16) -> str: ...


class RandomIds:
    """Identifiers from the operating system's CSPRNG.

    Order ids carry 128 random bits as 32 hex characters: unguessable, and valid as
    WeChat Pay `out_trade_no` (6-32 chars) and Alipay `out_trade_no` (<= 64 chars).
    """

    def order_id(self) -> str:
        return secrets.token_hex(16)

    def token(self, nbytes: int = 16) -> str:
        return secrets.token_hex(nbytes)

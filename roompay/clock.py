"""Time and identifiers, injected everywhere so that tests can drive them."""

import secrets
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """Tells the current time as an aware UTC datetime."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


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

"""Fault injection for the sandbox: provider errors and refund outcomes on demand.

Tests (and curious operators) arm a fault for the next N calls of one operation
of one provider; the emulator takes it when that call arrives. Faults are what
real gateways do on bad days: a SYSTEM_ERROR answer, a bare HTTP 500, or a
request that is carried out but whose answer is late (the client times out and
must retry safely with the same idempotency key).
"""

from collections import defaultdict
from enum import StrEnum


class FaultKind(StrEnum):
    """What goes wrong."""

    SYSTEM_ERROR = "system_error"  # the provider's own retryable error code, properly signed
    HTTP_500 = "http_500"  # a bare 500 from a front server, unsigned
    SLOW = "slow"  # the call is carried out, but the answer comes after `slow_s`


class RefundMode(StrEnum):
    """How refunds end at the provider."""

    SUCCESS = "success"  # at once
    PROCESSING = "processing"  # accepted; success after `processing_queries` queries
    ABNORMAL = "abnormal"  # accepted, then abnormal: the money cannot go back by itself


class Faults:
    """Armed faults and refund behaviour, per provider ("wechatpay", "alipay")."""

    def __init__(self, slow_s: float = 2.0, processing_queries: int = 1) -> None:
        self.slow_s = slow_s
        self.processing_queries = processing_queries
        self._armed: dict[tuple[str, str], list[FaultKind]] = defaultdict(list)
        self.refund_mode: dict[str, RefundMode] = {}

    def arm(self, provider: str, operation: str, kind: FaultKind, count: int = 1) -> None:
        """Make the next `count` calls of `operation` fail with `kind`."""
        self._armed[(provider, operation)].extend([kind] * count)

    def take(self, provider: str, operation: str) -> FaultKind | None:
        """The fault for this call, if one is armed (and disarm it)."""
        queue = self._armed.get((provider, operation))
        return queue.pop(0) if queue else None

    def refunds(self, provider: str) -> RefundMode:
        """How this provider's refunds end now."""
        return self.refund_mode.get(provider, RefundMode.SUCCESS)

    def clear(self) -> None:
        """Disarm everything and restore immediate refunds."""
        self._armed.clear()
        self.refund_mode.clear()

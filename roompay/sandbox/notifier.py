"""Delivers a provider's notifications with the provider's real retry schedule.

Both providers send a notification, and send it again on a fixed schedule until
the merchant answers with the success reply. `time_scale` divides every delay so
that tests and demos can replay a day-long schedule in seconds.
"""

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

# WeChat Pay: 15s/15s/30s/3m/10m/20m/30m/30m/30m/60m/3h/3h/3h/6h/6h (24h4m in all).
WECHAT_RETRY_DELAYS_S: tuple[float, ...] = (
    0,
    15,
    15,
    30,
    180,
    600,
    1200,
    1800,
    1800,
    1800,
    3600,
    10800,
    10800,
    10800,
    21600,
    21600,
)
# Alipay: 4m,10m,10m,1h,2h,6h,15h after the first delivery (8 deliveries in ~25 h).
ALIPAY_RETRY_DELAYS_S: tuple[float, ...] = (0, 240, 600, 600, 3600, 7200, 21600, 54000)


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification to deliver: the exact bytes and headers the provider sends.

    `resign`, when given, makes fresh headers for each attempt: a signature carries
    its timestamp, and a retry hours later must not arrive with a stale one.
    """

    url: str
    body: bytes
    headers: dict[str, str]
    accepted: Callable[[httpx.Response], bool]
    resign: Callable[[bytes], dict[str, str]] | None = None


@dataclass
class DeliveryRecord:
    """What happened to one notification, for tests and the sandbox's own pages."""

    url: str
    attempts: int = 0
    delivered: bool = False
    last_status: int | None = None


class Notifier:
    """Sends notifications in the background, retrying on the provider's schedule."""

    def __init__(
        self,
        time_scale: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._time_scale = max(time_scale, 1e-9)
        self._transport = transport
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None  # made inside the event loop that uses it
        self._tasks: set[asyncio.Task[None]] = set()
        self.records: list[DeliveryRecord] = []

    def send(self, notification: Notification, delays_s: Sequence[float]) -> DeliveryRecord:
        """Start delivering in the background and return its live record."""
        record = DeliveryRecord(url=notification.url)
        self.records.append(record)
        task = asyncio.get_running_loop().create_task(self._deliver(notification, delays_s, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    async def _deliver(
        self, notification: Notification, delays_s: Sequence[float], record: DeliveryRecord
    ) -> None:
        for delay in delays_s:
            if delay:
                await asyncio.sleep(delay / self._time_scale)
            record.attempts += 1
            if self._client is None:
                self._client = httpx.AsyncClient(transport=self._transport, timeout=self._timeout_s)
            headers = notification.headers
            if notification.resign is not None and record.attempts > 1:
                headers = notification.resign(notification.body)
            try:
                response = await self._client.post(
                    notification.url, content=notification.body, headers=headers
                )
            except httpx.HTTPError as exc:
                log.info("notify to %s failed: %s", notification.url, exc)
                continue
            record.last_status = response.status_code
            if notification.accepted(response):
                record.delivered = True
                return
        log.warning("notify to %s gave up after %d attempts", notification.url, record.attempts)

    async def aclose(self) -> None:
        """Stop pending deliveries and close the HTTP client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

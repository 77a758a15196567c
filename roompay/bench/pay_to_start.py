"""Pay -> start: a signed payment notify in, until the server has recorded the device's acceptance.

Closed loop at a fixed concurrency (each of `c` connections sends the next notify
once its previous order is accepted), or open loop at a fixed rate (the fleet
phase). The same prepared notifies, freshly signed, go first to the baseline and
then to roompay, so both do the same work on the same orders.
"""

import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from roompay.bench.http import BareHttp, HttpError
from roompay.bench.stack import Prepared, Stack

NOTIFY_PATH = "/api/v1/notify/wechatpay"
BASELINE_PATH = "/notify/wechatpay"
ACCEPT_TIMEOUT_S = 30.0


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of the values lie (nearest rank)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


@dataclass
class Sample:
    """What one load phase measured."""

    latencies_ms: list[float] = field(default_factory=list)
    http_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        """p50/p99 of the latency, throughput and errors, rounded for the report."""
        done = len(self.latencies_ms)
        return {
            "count": done,
            "errors": len(self.errors),
            "p50_ms": round(statistics.median(self.latencies_ms), 2) if done else 0.0,
            "p99_ms": round(percentile(self.latencies_ms, 0.99), 2),
            "per_second": round(done / self.wall_s, 1) if self.wall_s else 0.0,
            "notify_p50_ms": round(statistics.median(self.http_ms), 2) if self.http_ms else 0.0,
        }


Job = Callable[[BareHttp, Prepared, dict[str, str], Sample], Awaitable[None]]


def roompay_job(stack: Stack) -> Job:
    """POST the notify to roompay; done when the server records the device's acceptance."""

    async def job(http: BareHttp, item: Prepared, headers: dict[str, str], sample: Sample) -> None:
        accepted = stack.expect(item.order_id)
        started = time.perf_counter()
        status, body = await http.send("POST", NOTIFY_PATH, item.body, headers)
        sample.http_ms.append((time.perf_counter() - started) * 1000)
        if status not in (200, 204):
            stack.waiters.pop(item.order_id, None)
            sample.errors.append(f"notify {item.order_id}: {status} {body[:200]!r}")
            return
        try:
            at = await asyncio.wait_for(accepted, ACCEPT_TIMEOUT_S)
        except TimeoutError:
            stack.waiters.pop(item.order_id, None)
            sample.errors.append(f"order {item.order_id}: no acceptance in {ACCEPT_TIMEOUT_S} s")
            return
        sample.latencies_ms.append((at - started) * 1000)

    return job


async def baseline_job(
    http: BareHttp, item: Prepared, headers: dict[str, str], sample: Sample
) -> None:
    """POST the notify to the baseline, which answers once its device has replied."""
    started = time.perf_counter()
    status, body = await http.send("POST", BASELINE_PATH, item.body, headers)
    elapsed = (time.perf_counter() - started) * 1000
    if status != 204:
        sample.errors.append(f"baseline {item.order_id}: {status} {body[:200]!r}")
        return
    sample.http_ms.append(elapsed)
    sample.latencies_ms.append(elapsed)


Signed = list[tuple[Prepared, dict[str, str]]]
"""Notifies with their signature headers, signed just before a phase."""


def sign_all(stack: Stack, items: list[Prepared]) -> Signed:
    """Sign every notify now: before a phase, so its CPU is not counted in the phase."""
    return [(item, stack.sign(item.body)) for item in items]


async def closed_loop(port: int, job: Job, signed: Signed, concurrency: int) -> Sample:
    """Run the notifies through `job`, `concurrency` at a time on as many connections."""
    queue = list(reversed(signed))
    sample = Sample()

    async def worker() -> None:
        http = BareHttp("127.0.0.1", port)
        try:
            while queue:
                item, headers = queue.pop()
                try:
                    await job(http, item, headers, sample)
                except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
                    sample.errors.append(f"{item.order_id}: {exc!r}")
                    await http.close()
        finally:
            await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.wall_s = time.perf_counter() - started
    return sample


async def open_loop(
    stack: Stack, port: int, job: Job, items: list[Prepared], rate: float
) -> Sample:
    """Send `items` at `rate` per second whatever the answers, each on a free connection."""
    sample = Sample()
    idle: list[BareHttp] = []
    tasks = []

    async def one(item: Prepared, headers: dict[str, str]) -> None:
        http = idle.pop() if idle else BareHttp("127.0.0.1", port)
        try:
            await job(http, item, headers, sample)
            idle.append(http)
        except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
            sample.errors.append(f"{item.order_id}: {exc!r}")
            await http.close()

    started = time.perf_counter()
    # Signed in slices as they go: a notify is valid for 5 minutes after signing.
    for index, item in enumerate(items):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(item, stack.sign(item.body))))
    await asyncio.gather(*tasks)
    sample.wall_s = time.perf_counter() - started
    for http in idle:
        await http.close()
    return sample

"""Feed fan-out: live dashboard subscribers, and how long an appliance's start takes to reach all.

Each subscriber holds `GET /api/v1/feed` (server-sent events) open with a staff
token. Orders are paid at a steady rate; the bare appliance notes the moment it
publishes `started` (the monotonic clock is shared by every process of the
machine), each subscriber the moment the `started` step of that order reaches it.
As in the other phases, the first starts warm up and are not counted: the first
fan-out after the streams join took 60-90 ms more than the next ones.
"""

import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from roompay.bench.http import BareHttp, HttpError
from roompay.bench.pay_to_start import open_loop, percentile, roompay_job
from roompay.bench.stack import STAFF_PASSWORD, STAFF_USER, Prepared, Stack

SETTLE_S = 3.0
JOIN_S = 1.0  # subscribers connected: their streams catch up from the database first
WARMUP_STARTS = 3


@dataclass
class _Subscriber:
    seen: dict[str, float] = field(default_factory=dict)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


async def _token(stack: Stack) -> str:
    http = BareHttp("127.0.0.1", stack.server_port)
    form = urlencode({"username": STAFF_USER, "password": STAFF_PASSWORD}).encode()
    status, body = await http.send(
        "POST", "/api/v1/auth/token", form, {"Content-Type": "application/x-www-form-urlencoded"}
    )
    await http.close()
    if status != 200:
        raise RuntimeError(f"no staff token: {status} {body[:200]!r}")
    return str(json.loads(body)["access_token"])


async def _subscribe(stack: Stack, token: str, subscriber: _Subscriber) -> None:
    http = BareHttp("127.0.0.1", stack.server_port)
    buffer = b""
    try:
        async for chunk in http.stream("/api/v1/feed", {"Authorization": f"Bearer {token}"}):
            subscriber.connected.set()
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            now = time.perf_counter()
            for frame in frames:
                for line in frame.split(b"\n"):
                    if line.startswith(b"data: "):
                        item = json.loads(line[6:])
                        if item["event"] == "started":
                            subscriber.seen.setdefault(item["order_id"], now)
    except (OSError, HttpError, asyncio.IncompleteReadError, ValueError) as exc:
        subscriber.error = repr(exc)
    finally:
        subscriber.connected.set()
        await http.close()


async def _all_seen(subs: list[_Subscriber], items: list[Prepared]) -> None:
    """Return once every subscriber saw every item start, or after `SETTLE_S`."""
    deadline = time.monotonic() + SETTLE_S
    wanted = {item.order_id for item in items}
    while time.monotonic() < deadline and any(wanted - s.seen.keys() for s in subs):
        await asyncio.sleep(0.05)


async def run_feed(
    stack: Stack, items: list[Prepared], subscribers: int, rate: float
) -> dict[str, Any]:
    """Pay `items` at `rate` with `subscribers` listening; figures of the fan-out.

    The first `WARMUP_STARTS` items warm the streams up and are not counted.
    """
    token = await _token(stack)
    subs = [_Subscriber() for _ in range(subscribers)]
    tasks = [asyncio.create_task(_subscribe(stack, token, s)) for s in subs]
    await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in subs)), 60)
    await asyncio.sleep(JOIN_S)
    warm, items = items[:WARMUP_STARTS], items[WARMUP_STARTS:]
    warming = await open_loop(stack, stack.server_port, roompay_job(stack), warm, rate)
    await _all_seen(subs, warm)
    sample = await open_loop(stack, stack.server_port, roompay_job(stack), items, rate)
    await _all_seen(subs, items)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    started = (await asyncio.to_thread(stack.fleet.stats))["started"]
    all_seen, each_seen, missed = [], [], 0
    for item in items:
        at = started.get(item.order_id)
        if at is None:
            missed += subscribers
            continue
        times = [s.seen[item.order_id] - at for s in subs if item.order_id in s.seen]
        missed += subscribers - len(times)
        each_seen += [t * 1000 for t in times]
        if len(times) == subscribers:
            all_seen.append(max(times) * 1000)
    errors = (
        len(warming.errors)
        + len(sample.errors)
        + missed
        + sum(1 for s in subs if s.error is not None)
    )
    return {
        "subscribers": subscribers,
        "starts": len(items),
        "all_seen_p50_ms": round(statistics.median(all_seen), 1) if all_seen else 0.0,
        "all_seen_p99_ms": round(percentile(all_seen, 0.99), 1),
        "each_p50_ms": round(statistics.median(each_seen), 1) if each_seen else 0.0,
        "each_p99_ms": round(percentile(each_seen, 0.99), 1),
        "missed": missed,
        "errors": errors,
    }

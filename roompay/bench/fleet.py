"""Fleet: many connected appliances with heartbeats while pay -> start runs at a steady rate.

The whole fleet is connected (each appliance beating every `heartbeat_s`, the beats
spread evenly), then orders are paid at `rate` per second for `duration_s`,
open loop. Errors are refused notifies, orders never accepted, appliances that lost
their connection and messages a responder could not handle. The server's and the
broker's resident memory are sampled throughout.
"""

import asyncio
import time
from typing import Any

from roompay.bench.pay_to_start import open_loop, roompay_job
from roompay.bench.stack import Stack, rss_mb


async def _sample_rss(pids: dict[str, int | None], peaks: dict[str, float]) -> None:
    while True:
        for name, pid in pids.items():
            if pid is not None:
                peaks[name] = max(peaks.get(name, 0.0), rss_mb(pid))
        await asyncio.sleep(0.5)


async def run_fleet_phase(
    stack: Stack, devices: int, rate: float, duration_s: float, heartbeat_s: float
) -> dict[str, Any]:
    """Connect the fleet up to `devices` appliances and pay `rate` orders/s for `duration_s`."""
    connected_before = sum(s["devices"] for s in await asyncio.to_thread(stack.fleet.ask, "stats"))
    more = stack.codes[connected_before:devices]
    connect_s = 0.0
    if more:
        connect_s = await asyncio.to_thread(stack.fleet.start, stack.fleet_specs(more, heartbeat_s))
    items, _ = await stack.prepare(stack.codes[: int(rate * duration_s)])
    orders = len(items)
    peaks: dict[str, float] = {}
    pids = {"server": stack.server.pid, "broker": stack.broker_pid}
    sampler = asyncio.create_task(_sample_rss(pids, peaks))
    before = await asyncio.to_thread(stack.fleet.stats)
    started = time.perf_counter()
    sample = await open_loop(stack, stack.server_port, roompay_job(stack), items, rate)
    wall = time.perf_counter() - started
    after = await asyncio.to_thread(stack.fleet.stats)
    sampler.cancel()
    figures = sample.figures()
    device_errors = after["error_count"] - before["error_count"]
    return {
        "devices": after["devices"],
        "connect_s": round(connect_s, 1),
        "rate_per_s": rate,
        "duration_s": round(wall, 1),
        "orders": orders,
        "accepted": figures["count"],
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
        "heartbeats": after["heartbeats"] - before["heartbeats"],
        "disconnected": after["disconnected"],
        "errors": figures["errors"] + device_errors + after["disconnected"],
        "error_samples": (sample.errors + after["errors"])[:5],
        "server_rss_mb": round(peaks.get("server", 0.0), 1),
        "broker_rss_mb": round(peaks.get("broker", 0.0), 1),
    }

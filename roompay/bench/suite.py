"""`roompay bench`: the whole suite in one run, roompay next to its own bare baseline.

Order of a run: start the stack (`stack.py`); check out and pay every order the
closed-loop phases need (the c=1 ones one at a time, with their QR rendered: the
checkout figures); warm both servers up; for each concurrency, the baseline then
roompay on the same notifies; the feed; and last the fleet, which connects the
rest of the appliances. Every run of an appliance is ended between phases, so
each phase finds the whole fleet idle.
"""

import asyncio
import gc
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roompay.bench.audit import audit, violations
from roompay.bench.cpu import CpuMeter, without_server_per_second
from roompay.bench.feed import WARMUP_STARTS, run_feed
from roompay.bench.fleet import run_fleet_phase
from roompay.bench.pay_to_start import (
    baseline_job,
    closed_loop,
    percentile,
    roompay_job,
    sign_all,
)
from roompay.bench.report import ratio, targets
from roompay.bench.stack import Stack, open_stack

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_MQTT = "own"


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does."""

    name: str
    orders: dict[int, int]  # concurrency -> orders
    fleet_devices: int
    fleet_rate: float
    fleet_s: float
    feed_subscribers: int
    feed_starts: int
    feed_rate: float = 5.0
    heartbeat_s: float = 30.0
    warmup: int = 10

    @property
    def feed_orders(self) -> int:
        """Orders the feed phase pays: its measured starts and its warm-up."""
        return self.feed_starts + WARMUP_STARTS


FULL = Sizes("full", {1: 200, 16: 1000, 64: 2000}, 10_000, 100.0, 60.0, 100, 50)
QUICK = Sizes("quick", {1: 50, 16: 200, 64: 400}, 1_000, 100.0, 10.0, 100, 20)
SMOKE = Sizes("smoke", {1: 4, 16: 16, 64: 64}, 80, 20.0, 2.0, 4, 3, 5.0, 5.0, 2)


@dataclass(frozen=True)
class BenchOptions:
    """What `roompay bench` was asked for."""

    sizes: Sizes = QUICK
    embedded: bool = False
    postgres_url: str = DEFAULT_POSTGRES
    mqtt_url: str = DEFAULT_MQTT
    profile: Path | None = None
    work_dir: Path | None = None
    log: Any = field(default=None, compare=False)


def run_suite(options: BenchOptions) -> dict[str, Any]:
    """Run the whole suite; return the results as a JSON-ready dict."""
    if options.work_dir is not None:
        options.work_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_suite(options, options.work_dir))
    with tempfile.TemporaryDirectory(prefix="roompay-bench-") as tmp:
        return asyncio.run(_suite(options, Path(tmp)))


_BEGAN = time.perf_counter()


def _say(options: BenchOptions, message: str) -> None:
    if options.log is not None:
        options.log(f"[{time.perf_counter() - _BEGAN:5.0f} s] {message}")


async def _suite(options: BenchOptions, work_dir: Path) -> dict[str, Any]:
    began = time.perf_counter()
    sizes = options.sizes
    first = min(sizes.fleet_devices, max([*sizes.orders.values(), sizes.feed_orders, sizes.warmup]))
    _say(options, f"starting the stack ({first} appliances first)")
    stack = await open_stack(
        work_dir,
        embedded=options.embedded,
        postgres_url=options.postgres_url,
        mqtt_url=options.mqtt_url,
        devices=max(sizes.fleet_devices, first),
        first_fleet=first,
        heartbeat_s=sizes.heartbeat_s,
    )
    try:
        await stack.wait_online(first)
        results = await _phases(options, stack)
    finally:
        await stack.close()
    backend = "SQLite + embedded broker" if options.embedded else "PostgreSQL + Mosquitto"
    results |= {
        "backend": backend,
        "mode": sizes.name,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "duration_s": round(time.perf_counter() - began, 1),
    }
    results["targets"] = targets(results)
    return results


async def _phases(options: BenchOptions, stack: Stack) -> dict[str, Any]:
    try:
        return await _measure(options, stack)
    finally:
        gc.enable()


async def _measure(options: BenchOptions, stack: Stack) -> dict[str, Any]:
    sizes = options.sizes
    codes = stack.codes
    levels = sorted(sizes.orders)
    _say(options, "checking out and paying the orders (c=1 ones one at a time, with QR)")
    warm, _ = await stack.prepare(codes[: sizes.warmup])
    prepared = {}
    checkout_ms: list[float] = []
    for level in levels:
        prepared[level], times = await stack.prepare(
            codes[: sizes.orders[level]], 1 if level == 1 else 16
        )
        if level == 1:
            checkout_ms = times
    feed_items, _ = await stack.prepare(codes[: sizes.feed_orders])

    _quiet_collector()
    _say(options, "warming up")
    await closed_loop(stack.baseline_port, baseline_job, sign_all(stack, warm), 1)
    await closed_loop(stack.server_port, roompay_job(stack), sign_all(stack, warm), 1)
    await stack.end_runs()

    rows = []
    for level in levels:
        items = prepared[level]
        _quiet_collector()
        _say(options, f"pay -> start at c={level}: baseline, then roompay ({len(items)} orders)")
        signed = sign_all(stack, items)
        meter = CpuMeter(stack.process_groups(stack.baseline.pid)).start()
        base = (await closed_loop(stack.baseline_port, baseline_job, signed, level)).figures()
        _add_cpu(base, meter, len(items))
        signed = sign_all(stack, items)
        spy = _start_profile(options, stack, level)
        meter = CpuMeter(stack.process_groups(stack.server.pid)).start()
        ours = (await closed_loop(stack.server_port, roompay_job(stack), signed, level)).figures()
        _add_cpu(ours, meter, len(items))
        _stop_profile(spy)
        ours["stages_ms"] = await stack.stages([item.order_id for item in items])
        await stack.end_runs()
        rows.append(
            {
                "concurrency": level,
                "roompay": ours,
                "baseline": base,
                "ratio_p50": ratio(ours["p50_ms"], base["p50_ms"]),
                "ratio_p99": ratio(ours["p99_ms"], base["p99_ms"]),
                "ratio_per_second": ratio(ours["per_second"], base["per_second"]),
            }
        )

    _quiet_collector()
    _say(options, f"feed: {sizes.feed_subscribers} subscribers")
    feed = await run_feed(stack, feed_items, sizes.feed_subscribers, sizes.feed_rate)
    await stack.end_runs()

    _quiet_collector()
    _say(options, f"fleet: {sizes.fleet_devices} appliances, {sizes.fleet_rate:.0f} orders/s")
    fleet = await run_fleet_phase(
        stack, sizes.fleet_devices, sizes.fleet_rate, sizes.fleet_s, sizes.heartbeat_s
    )
    _say(options, "ending every run; auditing the orders")
    await stack.end_runs()
    counts = await asyncio.to_thread(audit, stack.database_url)
    return {
        "audit": counts | {"violations": violations(counts)},
        "anomalies": {
            "stuck_running": stack.stuck_running,
            "refused_checkouts": stack.refused_checkouts,
        },
        "pay_to_start": rows,
        "checkout": {
            "count": len(checkout_ms),
            "p50_ms": round(statistics.median(checkout_ms), 2) if checkout_ms else 0.0,
            "p99_ms": round(percentile(checkout_ms, 0.99), 2),
        },
        "feed": feed,
        "fleet": fleet,
    }


def _quiet_collector() -> None:
    """Collect the bench's own garbage now, between phases, and not during the next one.

    A full collection in this process paused it 50-160 ms in the middle of a phase,
    and every subscriber and waiter here then saw the step late: the figures measured
    the bench, not the servers. What the bench holds is frozen out of later passes;
    `_phases` turns the collector back on at its end. The servers are untouched (theirs
    freeze what they load, `roompay serve`, and collect as usual).
    """
    gc.collect()
    gc.freeze()
    gc.disable()


def _add_cpu(figures: dict[str, Any], meter: CpuMeter, orders: int) -> None:
    """The phase's CPU per order: the server's, each process group's, and the rate the
    machine could carry if the server cost nothing."""
    by_process = meter.per_order(orders)
    figures["cpu_ms_per_order"] = by_process["server"]
    figures["cpu_ms_by_process"] = by_process
    figures["without_server_per_second"] = without_server_per_second(
        by_process, os.cpu_count() or 1
    )


def _start_profile(
    options: BenchOptions, stack: Stack, level: int
) -> "subprocess.Popen[bytes] | None":
    """py-spy on the server while roompay runs at c=16, if asked for (GIL holder only)."""
    if options.profile is None or level != 16:
        return None
    spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(  # noqa: S603 - py-spy of our own venv, on our own child
        [
            str(spy),
            "record",
            "--pid",
            str(stack.server.pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(options.profile),
            "--nonblocking",
            # Only the thread holding the GIL: the server is one interpreter, so that is
            # where its time goes (a thread waiting in poll() would count as busy).
            "--gil",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_profile(spy: "subprocess.Popen[bytes] | None") -> None:
    if spy is None:
        return
    spy.send_signal(signal.SIGINT)
    spy.wait(60)


__all__ = ["FULL", "QUICK", "SMOKE", "BenchOptions", "Sizes", "run_suite"]

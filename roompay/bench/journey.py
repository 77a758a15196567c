"""`roompay bench journey` and `bench notify`: single-process figures in the demo setup.

`journey` measures what a guest feels in the demo setup (SQLite, the embedded
broker, the sandbox, a simulated appliance, all in one process): the time from the
sandbox payment to the server committing the paid order, and to the appliance
reporting that it started. `notify` measures notify handling alone (verify, decrypt,
commit, reply) on a server in this process. The whole suite is `roompay.bench.suite`.
"""

import json
import multiprocessing
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import func, select

from roompay.demo import DemoOptions, build_demo_runtime, start_agents
from roompay.domain.catalog import Wallet
from roompay.runtime import Runtime
from roompay.services.checkout import CheckoutRequest, checkout
from roompay.services.seed import ensure_demo
from roompay.services.timeline import order_timeline
from roompay.settings import Settings
from roompay.store.db import transaction
from roompay.store.models import PaymentNotice
from roompay.web.app import create_app


@dataclass(frozen=True)
class JourneyFigures:
    """Latency figures of repeated scan-to-run journeys, in milliseconds."""

    count: int
    pay_to_paid_ms_p50: float
    pay_to_started_ms_p50: float
    pay_to_started_ms_p90: float
    pay_to_started_ms_max: float
    checkout_ms_p50: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_status(
    http: httpx.Client, order_id: str, statuses: set[str], timeout_s: float
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body: dict[str, object] = http.get(f"/api/v1/orders/{order_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.005)
    raise TimeoutError(f"order {order_id} did not reach {statuses}")


def run_journeys(count: int) -> JourneyFigures:
    """Run `count` journeys against a fresh in-process demo and measure them."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="roompay-bench-") as tmp:
        options = DemoOptions("127.0.0.1", port, Path(tmp), 4, "bench", 100_000.0)
        runtime = build_demo_runtime(options)
        runtime.start()
        with transaction(runtime.ctx.sessions) as session:
            codes = ensure_demo(session, 4).device_codes
        agents = start_agents(runtime, codes[:1], options.time_scale)
        server = _serve(runtime, port)
        try:
            return _measure(runtime, f"http://127.0.0.1:{port}", codes[0], count)
        finally:
            server.stop()
            for agent in agents:
                agent.stop()
            runtime.stop()


@dataclass
class _Server:
    """The app served by uvicorn in a thread of this process."""

    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _serve(runtime: Runtime, port: int) -> _Server:
    """Serve the runtime's app on a loopback port; return once it accepts connections."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime, manage_runtime=False),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:  # uvicorn offers no event to wait on
        time.sleep(0.01)
    return _Server(server, thread)


def _measure(runtime: Runtime, base: str, device: str, count: int) -> JourneyFigures:
    to_paid, to_started, checkouts = [], [], []
    with httpx.Client(base_url=base, timeout=10) as http:
        for index in range(count):
            wallet = "wechat" if index % 2 == 0 else "alipay"
            t0 = time.perf_counter()
            order = http.post(
                "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": wallet}
            ).json()
            checkouts.append((time.perf_counter() - t0) * 1000)
            paid_at_wall = datetime.now().astimezone()
            http.post("/sandbox/pay", json={"qr": order["qr"]}).raise_for_status()
            done = _wait_status(http, order["order_id"], {"completed"}, 30)
            started = datetime.fromisoformat(str(done["started_at"]))
            to_started.append((started - paid_at_wall).total_seconds() * 1000)
            with runtime.ctx.sessions() as session:
                paid = next(
                    e.at for e in order_timeline(session, order["order_id"]) if e.event == "paid"
                )
            to_paid.append((paid - paid_at_wall).total_seconds() * 1000)
    ordered = sorted(to_started)
    return JourneyFigures(
        count=count,
        pay_to_paid_ms_p50=round(statistics.median(to_paid), 1),
        pay_to_started_ms_p50=round(statistics.median(to_started), 1),
        pay_to_started_ms_p90=round(ordered[max(0, int(len(ordered) * 0.9) - 1)], 1),
        pay_to_started_ms_max=round(ordered[-1], 1),
        checkout_ms_p50=round(statistics.median(checkouts), 1),
    )


def write_json(figures: "JourneyFigures | list[NotifyFigures]", path: Path) -> None:
    """Write figures as JSON."""
    items: list[JourneyFigures] | list[NotifyFigures] = (
        figures if isinstance(figures, list) else [figures]
    )
    path.write_text(json.dumps([asdict(f) for f in items], indent=2))


@dataclass(frozen=True)
class NotifyFigures:
    """Notify handling: verified, decrypted, committed with its outbox row, answered."""

    backend: str
    concurrency: int
    count: int
    per_second: float
    p50_ms: float
    p99_ms: float
    paid: int


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def _fire(
    url: str, bodies: list[tuple[bytes, dict[str, str]]], concurrency: int
) -> tuple[float, list[float]]:
    """POST each notify once, `concurrency` at a time; return wall seconds and latencies (ms)."""
    latencies: list[float] = []
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=concurrency)) as http:

        def one(item: tuple[bytes, dict[str, str]]) -> None:
            start = time.perf_counter()
            response = http.post(url, content=item[0], headers=item[1])
            latencies.append((time.perf_counter() - start) * 1000)
            if response.status_code not in (200, 204):
                raise RuntimeError(f"notify refused: {response.status_code} {response.text}")

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, bodies))
        return time.perf_counter() - started, latencies


def _paid_count(runtime: Runtime) -> int:
    with runtime.ctx.sessions() as session:
        query = (
            select(func.count()).select_from(PaymentNotice).where(PaymentNotice.outcome == "paid")
        )
        return int(session.scalar(query) or 0)


def run_notify_bench(
    database_url: str | None, count: int, concurrencies: list[int]
) -> list[NotifyFigures]:
    """Measure notify handling against a fresh in-process server on the given database."""
    port = _free_port()
    results = []
    with tempfile.TemporaryDirectory(prefix="roompay-bench-") as tmp:
        options = DemoOptions("127.0.0.1", port, Path(tmp), 4, "bench", 1.0)
        # Active queries would find the held payments first: keep them out of the measurement.
        base = Settings(
            require_device_online=False, database_url=database_url, query_after_s=86_400
        )
        runtime = build_demo_runtime(options, base, hold_notifies=True)
        runtime.start()
        with transaction(runtime.ctx.sessions) as session:
            codes = ensure_demo(session, 4).device_codes
        server = _serve(runtime, port)
        sandbox = runtime.sandbox
        assert sandbox is not None
        backend = runtime.engine.dialect.name
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                for concurrency in concurrencies:
                    notifies = []
                    paid_before = _paid_count(runtime)
                    for _ in range(count):
                        order = checkout(
                            runtime.ctx, CheckoutRequest(codes[0], "dry30", Wallet.WECHAT)
                        )
                        held = sandbox.held_notifies
                        before = len(held)
                        http.post("/sandbox/pay", json={"qr": order.qr}).raise_for_status()
                        while len(held) <= before:
                            time.sleep(0.001)
                        notify = held[before]
                        notifies.append((notify.content, {"Content-Type": "application/json"}))
                    # Fresh signatures just before firing: a notify is valid for 5 minutes
                    signed = [
                        (body, headers | sandbox.wechatpay.sign_notify(body))
                        for body, headers in notifies
                    ]
                    # The load comes from another process, so it does not share our GIL
                    spawn = multiprocessing.get_context("spawn")
                    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                        wall, latencies = pool.submit(
                            _fire,
                            f"http://127.0.0.1:{port}/api/v1/notify/wechatpay",
                            signed,
                            concurrency,
                        ).result()
                    paid = _paid_count(runtime) - paid_before
                    results.append(
                        NotifyFigures(
                            backend,
                            concurrency,
                            count,
                            round(count / wall, 1),
                            round(statistics.median(latencies), 2),
                            round(_percentile(latencies, 0.99), 2),
                            paid,
                        )
                    )
        finally:
            server.stop()
            runtime.stop()
    return results

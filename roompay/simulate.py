"""`roompay simulate`: a fleet of simulated appliances and guests against a real server process.

The server runs as a separate `python -m roompay serve` process on the chosen
database and broker; this process owns everything around it: the broker (the
embedded one unless a URL is given), the provider sandbox (served here, so that
the provider remembers its trades when the server is killed, as a real one
would), the appliances (`DeviceAgent`s with their journals) and the guests, who
check out over HTTP and pay through the sandbox.

With faults (seeded; the plan of every order is reproducible from the seed, the
network faults are drawn from the same seed but depend on timing):

- duplicate notifies: the sandbox delivers the payment notification twice, at once;
- device reboots: a power cut while the relay is on, then a new agent on the same journal;
- devices offline at payment: the agent stops after checkout, comes back later or never;
- MQTT drops and delays: a proxy between the appliances and the broker holds
  PUBLISH packets, or drops one together with its connection (as a lossy network
  does: within a live TCP connection nothing is lost);
- a broker restart (the embedded broker restarted on its port; an external broker
  is not ours to restart, so every connection through the proxy is cut and refused
  for a while instead);
- the server killed with SIGKILL and started again.

At the end the whole history is checked (`check_history`): from the database, the
appliances' journals, the provider's own records, the ledger, and a reconciliation
of each day against the provider's bill (the provider's clock is moved to the next
day for that, once everything else has stopped, because bills exist for finished
days only).
"""

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from roompay.clock import OffsetClock
from roompay.demo import sandbox_merchant_settings
from roompay.domain.catalog import ApplianceKind, Program, Wallet, default_programs
from roompay.domain.ledger import beijing_day
from roompay.payments.base import RefundState
from roompay.payments.errors import PaymentError
from roompay.payments.factory import build_providers
from roompay.protocol.mqtt_url import MqttEndpoint, parse_mqtt_url
from roompay.runtime import Runtime
from roompay.sandbox.app import Sandbox
from roompay.services.ledger import account_balances, unbalanced_entries
from roompay.services.reconciliation import reconcile_day
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.settings import Settings
from roompay.simulate_fleet import (
    DEVICES_PER_WORKER,
    BrokerProcess,
    Fleet,
    FleetOutcome,
    RunStart,
)
from roompay.store.db import make_engine, session_factory, transaction, upgrade
from roompay.store.models import LedgerEntry, Order, Refund, RunEventRecord

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "refunded", "partially_refunded", "expired"})
OPEN_REFUNDS = frozenset({"requested", "processing"})
SECRET_KEY = "simulation-secret-key-not-for-production-use-0123456789"  # noqa: S105 - a loopback simulation's own key

# Server timings for a fast run, well below the defaults (60 s deadline, 5 s re-send).
# The start deadline leaves room for a loaded machine: a start given up on while
# its answer waits in a backlog runs anyway and is refunded in full (a leak).
SERVER_TIMINGS = {
    "ROOMPAY_CHECKOUT_TTL_S": "8",
    "ROOMPAY_START_DEADLINE_S": "15",
    "ROOMPAY_COMMAND_RESEND_S": "2",
    "ROOMPAY_QUERY_AFTER_S": "1",
    "ROOMPAY_QUERY_INTERVAL_S": "1",
    "ROOMPAY_MAINTENANCE_INTERVAL_S": "0.5",
}
SANDBOX_TIME_SCALE = 100.0  # the notify retry schedule: 15 s becomes 0.15 s
ABANDON_SHARE = 0.1
DUPLICATE_SHARE = 0.15
OFFLINE_SHARE = 0.04
REBOOT_SHARE = 0.05
MQTT_DROP_SHARE = 0.01
MQTT_DELAY_SHARE = 0.05
ORDER_WAIT_S = 60.0
# The fleet runs in worker processes of at most DEVICES_PER_WORKER appliances each
# (paho's select() fails past descriptor 1023); the simulator itself carries no paho client.
MAX_DEVICES = 2000
MAX_SERVERS = 4
SETTLE_WAIT_S = 60.0


class FaultKind(StrEnum):
    """What the simulation does to the system."""

    DUPLICATE_NOTIFY = "duplicate_notify"
    DEVICE_REBOOT = "device_reboot"
    DEVICE_OFFLINE = "device_offline"
    MQTT_DROP = "mqtt_drop"
    MQTT_DELAY = "mqtt_delay"
    BROKER_RESTART = "broker_restart"
    SERVER_KILL = "server_kill"


class Invariant(StrEnum):
    """What must hold over the whole history (research/reliability.md §1)."""

    SETTLED = "every paid order reached a final state"
    PAID_RAN_OR_REFUNDED = "every paid order ran or was refunded in full"
    AT_MOST_ONE_RUN = "at most one run per order"
    NO_RUN_WITHOUT_PAYMENT = "no run without payment"
    REFUND_WITHIN_PAID = "refunds never above the amount paid"
    REFUND_ONCE_PER_KEY = "one provider refund per refund key, as booked"
    LEDGER_BALANCED = "every ledger entry balances"
    RECONCILED = "the providers' bills match the ledger"


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant, with the order (or other key) it concerns."""

    invariant: Invariant
    key: str
    detail: str


@dataclass(frozen=True, slots=True)
class RefundFacts:
    """A refund as booked, and as the provider reports it (None when not asked)."""

    key: str
    amount_fen: int
    status: str
    reason: str
    provider_state: str | None = None
    provider_amount_fen: int | None = None


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """An order at the end of the run."""

    order_id: str
    status: str
    amount_fen: int
    paid_fen: int | None
    flag: str | None
    started_runs_in_db: int
    refunds: tuple[RefundFacts, ...] = ()
    has_qr: bool = True


@dataclass
class History:
    """Everything the checker looks at."""

    orders: list[OrderFacts]
    starts: list[RunStart]
    unbalanced_entries: list[int] = field(default_factory=list)
    ledger_sum_fen: int = 0
    # (day, wallet) -> keys that differ; None when no reconciliation was possible
    reconciliation: dict[str, list[str]] | None = None


def check_history(history: History) -> tuple[list[Violation], int]:
    """Check every invariant over the whole history; return the violations and the leaks.

    A leak is an order that ran and was still refunded in full because its start
    was given up before the appliance's report arrived: guest-favouring, counted,
    not a violation (research/reliability.md §1, invariant 1).
    """
    violations: list[Violation] = []
    runs: dict[str, list[RunStart]] = defaultdict(list)
    for start in history.starts:
        runs[start.order_id].append(start)
    known = {order.order_id for order in history.orders}
    for order_id in runs:
        if order_id not in known:
            violations.append(
                Violation(Invariant.NO_RUN_WITHOUT_PAYMENT, order_id, "ran for an unknown order")
            )
    leaks = 0
    for order in history.orders:
        violations += _check_order(order, runs.get(order.order_id, []))
        ran = bool(runs.get(order.order_id)) or order.started_runs_in_db > 0
        start_refunded = sum(
            r.amount_fen for r in order.refunds if r.status == "refunded" and "start" in r.reason
        )
        if ran and order.paid_fen is not None and start_refunded >= order.paid_fen:
            leaks += 1
    keys = Counter(r.key for order in history.orders for r in order.refunds)
    violations += [
        Violation(Invariant.REFUND_ONCE_PER_KEY, key, f"booked {count} times")
        for key, count in keys.items()
        if count > 1
    ]
    violations += [
        Violation(Invariant.LEDGER_BALANCED, f"entry {entry}", "debits differ from credits")
        for entry in history.unbalanced_entries
    ]
    if history.ledger_sum_fen != 0:
        violations.append(
            Violation(
                Invariant.LEDGER_BALANCED, "ledger", f"accounts sum to {history.ledger_sum_fen}"
            )
        )
    for report, keys_differing in (history.reconciliation or {}).items():
        violations += [
            Violation(Invariant.RECONCILED, report, difference) for difference in keys_differing
        ]
    return violations, leaks


def _check_order(order: OrderFacts, started: list[RunStart]) -> list[Violation]:
    found: list[Violation] = []
    key = order.order_id

    def fail(invariant: Invariant, detail: str) -> None:
        found.append(Violation(invariant, key, detail))

    open_refunds = [r.key for r in order.refunds if r.status not in ("refunded", "cancelled")]
    # An unpaid order that never ends moves no money: it is reported as stuck, not here.
    if (order.status not in TERMINAL and order.paid_fen is not None) or open_refunds:
        fail(Invariant.SETTLED, f"status {order.status}, open refunds {open_refunds}")
    if len(started) > 1 or order.started_runs_in_db > 1:
        runs = sorted({s.run_id for s in started})
        fail(Invariant.AT_MOST_ONE_RUN, f"{len(started)} starts (runs {runs})")
    ran = bool(started) or order.started_runs_in_db > 0
    if ran and (order.paid_fen is None or order.flag is not None):
        fail(Invariant.NO_RUN_WITHOUT_PAYMENT, f"ran while paid={order.paid_fen} flag={order.flag}")
    refunded = sum(r.amount_fen for r in order.refunds if r.status == "refunded")
    owed = sum(r.amount_fen for r in order.refunds if r.status != "cancelled")
    paid = order.paid_fen or 0
    if refunded > paid or owed > paid:
        fail(Invariant.REFUND_WITHIN_PAID, f"paid {paid}, refunded {refunded}, owed {owed}")
    if order.paid_fen is not None and not ran and refunded != order.paid_fen:
        fail(Invariant.PAID_RAN_OR_REFUNDED, f"never ran; paid {paid}, refunded {refunded}")
    for refund in order.refunds:
        if refund.provider_state is None:
            continue
        booked_done = refund.status == "refunded"
        provider_done = refund.provider_state == RefundState.SUCCESS.value
        if booked_done != provider_done or (
            provider_done and refund.provider_amount_fen != refund.amount_fen
        ):
            fail(
                Invariant.REFUND_ONCE_PER_KEY,
                f"{refund.key}: booked {refund.status} {refund.amount_fen}, provider"
                f" {refund.provider_state} {refund.provider_amount_fen}",
            )
    return found


# --- the report --------------------------------------------------------------------


@dataclass
class SimulationReport:
    """What a simulation did and found."""

    backend: str
    devices: int
    orders_requested: int
    orders_placed: int
    seed: int
    faults: bool
    outcomes: dict[str, int]
    faults_injected: dict[str, int]
    invariants: dict[str, int]
    violations: list[Violation]
    leaks: int
    notes: list[str]
    duration_s: float

    @property
    def ok(self) -> bool:
        """Tell whether every invariant held."""
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form."""
        data = asdict(self)
        data["ok"] = self.ok
        data["violations"] = [
            {"invariant": v.invariant.name.lower(), "key": v.key, "detail": v.detail}
            for v in self.violations
        ]
        return data


def summary_lines(report: SimulationReport) -> list[str]:
    """The report as plain text tables, one line each."""
    lines = [
        f"roompay simulate: {report.devices} devices, {report.orders_placed}/"
        f"{report.orders_requested} orders placed, seed {report.seed},"
        f" faults {'on' if report.faults else 'off'}, {report.backend},"
        f" {report.duration_s:.1f} s",
        "",
        f"{'orders by outcome':<44}{'count':>8}",
    ]
    lines += [f"  {name:<42}{count:>8}" for name, count in sorted(report.outcomes.items())]
    lines += ["", f"{'faults injected':<44}{'count':>8}"]
    lines += [f"  {name:<42}{count:>8}" for name, count in report.faults_injected.items()]
    lines += ["", f"{'invariant':<44}{'result':>8}"]
    for name, broken in report.invariants.items():
        lines.append(f"  {name:<42}{'ok' if broken == 0 else f'{broken} BAD':>8}")
    lines.append(f"  {'possible leaks (ran, refunded in full)':<42}{report.leaks:>8}")
    lines += [f"note: {note}" for note in report.notes]
    lines += [f"VIOLATION {v.invariant.name}: {v.key}: {v.detail}" for v in report.violations[:50]]
    if len(report.violations) > 50:
        lines.append(f"... and {len(report.violations) - 50} more violations")
    lines.append("result: " + ("all invariants held" if report.ok else "VIOLATIONS FOUND"))
    return lines


# --- the sandbox, served here ------------------------------------------------------

DUPLICATE_HEADER = "x-simulate-duplicate-notify"
_duplicate_notify: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "duplicate_notify", default=False
)


class _DuplicateMarker:
    """Marks a guest's payment whose notification the wire will duplicate.

    The sandbox sends the notification from a task created inside the pay request,
    so the context variable set here travels with every delivery attempt.
    """

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            wanted = (DUPLICATE_HEADER.encode(), b"1") in scope["headers"]
            token = _duplicate_notify.set(wanted)
            try:
                await self._app(scope, receive, send)
            finally:
                _duplicate_notify.reset(token)
            return
        await self._app(scope, receive, send)


class _DuplicatingWire(httpx.AsyncBaseTransport):
    """The provider's notification wire: sends marked notifications twice, concurrently."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.duplicated = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not _duplicate_notify.get():
            return await self._inner.handle_async_request(request)
        body = await request.aread()
        twin = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        first, second = await asyncio.gather(
            self._inner.handle_async_request(request),
            self._inner.handle_async_request(twin),
            return_exceptions=True,
        )
        self.duplicated += 1
        if isinstance(second, httpx.Response):
            await second.aread()
            await second.aclose()
        if isinstance(first, BaseException):
            raise first
        return first

    async def aclose(self) -> None:
        await self._inner.aclose()


class _SandboxServer:
    """The provider sandbox on its own loopback port, in a thread of this process."""

    def __init__(self, state_dir: Path, clock: OffsetClock, port: int) -> None:
        self.wire = _DuplicatingWire()
        self.sandbox = Sandbox(
            state_dir, clock=clock, time_scale=SANDBOX_TIME_SCALE, notify_transport=self.wire
        )
        self.base_url = f"http://127.0.0.1:{port}"
        sandbox = self.sandbox

        @contextlib.asynccontextmanager
        async def lifespan(_app: FastAPI) -> Any:
            try:
                yield
            finally:
                await sandbox.aclose()
                await self.wire.aclose()

        app = FastAPI(title="roompay provider sandbox (simulation)", lifespan=lifespan)
        app.include_router(sandbox.router())
        self._server = uvicorn.Server(
            uvicorn.Config(
                _DuplicateMarker(app),
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
            )
        )
        self._thread = threading.Thread(target=self._server.run, name="sandbox", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the sandbox did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)


# --- the MQTT fault proxy ------------------------------------------------------------

_PUBLISH = 3


class _MqttProxy:
    """A TCP proxy in front of the broker that understands MQTT framing.

    Two listeners: the appliances' (PUBLISH packets held there, or dropped with
    their connection, once `faulty`) and the server's (clean). `outage` cuts every
    connection and refuses new ones for a while, as a broker restart looks to its clients.
    """

    def __init__(self, upstream: MqttEndpoint, rng: random.Random) -> None:
        # Where new connections go; a broker restart points it at the new broker.
        self.upstream = upstream
        self._rng = rng
        # Off while the fleet boots: a dropped boot message costs an agent its start timeout.
        self.faulty = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._refuse_until = 0.0
        self.device_port = 0
        self.server_port = 0
        self.dropped = 0
        self.delayed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the MQTT proxy did not start")

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def outage(self, seconds: float) -> None:
        """Cut every connection now and refuse new ones for `seconds`."""
        self._refuse_until = time.monotonic() + seconds
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_all)

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()
            self._loop = None

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        devices = await asyncio.start_server(
            lambda r, w: self._connection(r, w, True), "127.0.0.1", 0
        )
        server = await asyncio.start_server(
            lambda r, w: self._connection(r, w, False), "127.0.0.1", 0
        )
        self.device_port = devices.sockets[0].getsockname()[1]
        self.server_port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            for listener in (devices, server):
                listener.close()
            self._cut_all()
            for listener in (devices, server):
                await listener.wait_closed()

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, faulty: bool
    ) -> None:
        if time.monotonic() < self._refuse_until:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream.host, self.upstream.port
            )
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, faulty),
                self._pump(up_reader, writer, faulty),
                return_exceptions=True,
            )
        finally:
            for side in (writer, up_writer):
                side.close()
                self._writers.discard(side)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, faulty: bool
    ) -> None:
        try:
            while True:
                header = await reader.readexactly(1)
                length_bytes, length = b"", 0
                for shift in range(0, 28, 7):
                    byte = await reader.readexactly(1)
                    length_bytes += byte
                    length += (byte[0] & 0x7F) << shift
                    if not byte[0] & 0x80:
                        break
                body = await reader.readexactly(length)
                if faulty and self.faulty and header[0] >> 4 == _PUBLISH:
                    draw = self._rng.random()
                    if draw < MQTT_DROP_SHARE:
                        # TCP never loses a packet inside a live connection: a lost message
                        # is a lost connection, and the session recovers it on reconnect.
                        self.dropped += 1
                        return
                    if draw < MQTT_DROP_SHARE + MQTT_DELAY_SHARE:
                        self.delayed += 1
                        await asyncio.sleep(self._rng.uniform(0.02, 0.3))
                writer.write(header + length_bytes + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


# --- the server process -----------------------------------------------------------


class _ServerProcess:
    """`python -m roompay serve` on a loopback port, with our environment."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path, name: str = "server") -> None:
        self._env = env
        self._port = port
        self._log_dir = log_dir
        self._name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._starts = 0

    def start(self, timeout_s: float = 60.0) -> None:
        self._starts += 1
        log_path = self._log_dir / f"{self._name}-{self._starts}.log"
        with log_path.open("wb") as log_file:
            self._process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "roompay",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self._port),
                ],
                env=self._env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2) as http:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"the server exited; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"http://127.0.0.1:{self._port}/readyz").status_code == 200:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"the server was not ready within {timeout_s} s; see {log_path}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(10)

    def stop(self) -> None:
        """Stop gracefully; kill if it does not stop within 15 s."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# --- the plan -----------------------------------------------------------------------


class Offline(StrEnum):
    """When an appliance that went offline at payment comes back."""

    LATER = "later"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class OrderPlan:
    """What one guest does, drawn from the seed."""

    index: int
    wallet: str
    pick: int
    abandon: bool = False
    duplicate_notify: bool = False
    offline: Offline | None = None
    offline_for_s: float = 0.0
    reboot: bool = False
    reboot_down_s: float = 0.0


def plan_orders(orders: int, devices: int, faults: bool, seed: int) -> list[OrderPlan]:
    """Every guest's plan, reproducible from the seed; each fault kind at least once."""
    rng = random.Random(seed)  # noqa: S311 - reproducible simulation, not security
    never_left = max(1, devices // 50) if devices >= 4 else 0
    plans = []
    for index in range(orders):
        wallet = rng.choice(("wechat", "alipay"))
        pick = rng.randrange(1000)
        abandon = rng.random() < ABANDON_SHARE
        plan = OrderPlan(index, wallet, pick, abandon=abandon)
        if faults and not abandon:
            offline: Offline | None = None
            if rng.random() < OFFLINE_SHARE:
                offline = Offline.LATER
                if never_left and rng.random() < 0.2:
                    offline, never_left = Offline.NEVER, never_left - 1
            plan = OrderPlan(
                index,
                wallet,
                pick,
                duplicate_notify=rng.random() < DUPLICATE_SHARE,
                offline=offline,
                offline_for_s=rng.uniform(1.0, 9.0),
                reboot=offline is None and rng.random() < REBOOT_SHARE,
                reboot_down_s=rng.uniform(0.0, 0.05),
            )
        plans.append(plan)
    if faults and orders >= 4:
        plans[0] = OrderPlan(0, plans[0].wallet, plans[0].pick, duplicate_notify=True)
        plans[1] = OrderPlan(1, plans[1].wallet, plans[1].pick, reboot=True, reboot_down_s=0.01)
        plans[2] = OrderPlan(
            2, plans[2].wallet, plans[2].pick, offline=Offline.LATER, offline_for_s=2.0
        )
        if devices >= 4 and orders >= 8 and not any(p.offline is Offline.NEVER for p in plans):
            plans[3] = OrderPlan(3, plans[3].wallet, plans[3].pick, offline=Offline.NEVER)
    return plans


# --- the guests ---------------------------------------------------------------------


class _UnavailableError(Exception):
    """The server did not answer in time."""


@dataclass
class _Run:
    """Shared state of one simulation run."""

    sandbox_url: str
    fleet: Fleet
    programs: dict[ApplianceKind, list[Program]]
    queue: deque[tuple[OrderPlan, int]]
    stopping: threading.Event
    deadline: float
    orders_per_s: float = 8.0
    began: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    placed: list[str] = field(default_factory=list)
    taken: int = 0
    unplaced: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    threads: list[threading.Thread] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fault(self, kind: FaultKind) -> None:
        with self.lock:
            self.faults[kind.value] += 1

    def background(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        with self.lock:
            self.threads.append(thread)
        thread.start()


class _Servers:
    """A guest's way to the servers: one of them, and the next one when it does not answer."""

    def __init__(self, clients: list[httpx.Client], first: int) -> None:
        self._clients = clients
        self._current = first % len(clients)

    @property
    def client(self) -> httpx.Client:
        return self._clients[self._current]

    def next(self) -> None:
        self._current = (self._current + 1) % len(self._clients)


def _retrying(
    run: _Run, http: _Servers, call: Callable[[httpx.Client], httpx.Response], give_up_s: float
) -> httpx.Response:
    """Call until a server answers below 500 (one may be down or restarting)."""
    deadline = min(time.monotonic() + give_up_s, run.deadline)
    pause = 0.05
    while True:
        try:
            response = call(http.client)
            if response.status_code < 500:
                return response
        except httpx.TransportError:
            pass
        http.next()
        if time.monotonic() > deadline or run.stopping.is_set():
            raise _UnavailableError
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)


def _guest_loop(run: _Run, code: str, http: _Servers) -> None:
    """One appliance's guests, one after another, while orders are left."""
    appliance = run.fleet.appliances[code]
    while not run.stopping.is_set() and not appliance.gone:
        with run.lock:
            if not run.queue:
                return
            plan, attempt = run.queue.popleft()
            run.taken += 1
            due = run.began + run.taken / run.orders_per_s
        # Guests arrive at a steady rate: a flat-out load measures the machine, not the system.
        pause = due - time.monotonic()
        if pause > 0 and run.stopping.wait(pause):
            return
        try:
            order = _checkout(run, http, code, plan, attempt)
        except _UnavailableError:
            order = None
        if order is None:
            with run.lock:
                if attempt < 3:
                    run.queue.append((plan, attempt + 1))
                else:
                    run.unplaced += 1
            if appliance.gone or time.monotonic() > run.deadline:
                return
            continue
        with run.lock:
            run.placed.append(order["order_id"])
        with contextlib.suppress(_UnavailableError):
            _one_guest(run, http, code, plan, order)


def _checkout(
    run: _Run, http: _Servers, code: str, plan: OrderPlan, attempt: int
) -> dict[str, Any] | None:
    """Check out, waiting while the appliance is busy or away; None if it never frees up."""
    appliance = run.fleet.appliances[code]
    programs = run.programs[appliance.kind]
    program = programs[-1] if plan.reboot else programs[plan.pick % len(programs)]
    body = {"device": code, "program": program.code, "wallet": plan.wallet}
    headers = {"Idempotency-Key": f"sim-{plan.index}-{attempt}"}
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up and not appliance.gone:
        response = _retrying(
            run, http, lambda c: c.post("/api/v1/checkout", json=body, headers=headers), 30
        )
        if response.status_code == 201:
            order: dict[str, Any] = response.json()
            return order
        if response.status_code != 409:
            raise RuntimeError(f"checkout refused: {response.status_code} {response.text}")
        if response.json()["error"]["code"] == "checkout_failed":
            return None  # the provider refused this key's checkout: the guest walks away
        time.sleep(0.1)
    return None


def _one_guest(
    run: _Run, http: _Servers, code: str, plan: OrderPlan, order: dict[str, Any]
) -> None:
    order_id = order["order_id"]
    if plan.abandon:
        _wait_terminal(run, http, order_id)
        return
    if plan.offline is not None:
        run.fleet.stop(code)
        run.fault(FaultKind.DEVICE_OFFLINE)
        if plan.offline is Offline.NEVER:
            run.fleet.appliances[code].gone = True
        else:

            def come_back() -> None:
                if not run.stopping.wait(plan.offline_for_s):
                    run.fleet.boot(code)

            run.background(come_back, f"back-{code}")
    if plan.reboot:
        # The fleet counts the power cuts it makes: the relay may never switch on.
        run.fleet.arm_power_cut(code, plan.reboot_down_s)
    headers = {DUPLICATE_HEADER: "1"} if plan.duplicate_notify else {}
    paid = httpx.post(
        f"{run.sandbox_url}/sandbox/pay", json={"qr": order["qr"]}, headers=headers, timeout=30
    )
    if paid.status_code == 200 and plan.duplicate_notify:
        run.fault(FaultKind.DUPLICATE_NOTIFY)
    _wait_terminal(run, http, order_id)
    if plan.reboot:
        run.fleet.disarm(code)


def _wait_terminal(run: _Run, http: _Servers, order_id: str) -> None:
    deadline = time.monotonic() + ORDER_WAIT_S
    # A guest's panel looks about once a second; 200 guests polling faster than that
    # load the server's HTTP side, not its device side, which is what is under test.
    pause = 0.25
    while time.monotonic() < deadline and not run.stopping.is_set():
        response = _retrying(run, http, lambda c: c.get(f"/api/v1/orders/{order_id}"), ORDER_WAIT_S)
        if response.status_code == 200 and response.json()["status"] in TERMINAL:
            return
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0)


# --- the whole run ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """The simulate command's options."""

    devices: int
    orders: int
    faults: bool = False
    database_url: str | None = None
    mqtt_url: str | None = None
    seed: int = 1
    time_scale: float = 100_000.0
    data_dir: Path | None = None
    topic_root: str | None = None
    orders_per_s: float = 8.0
    max_duration_s: float = 900.0
    servers: int = 1
    devices_per_worker: int = DEVICES_PER_WORKER


def run_simulation(
    devices: int,
    orders: int,
    faults: bool,
    database_url: str | None,
    mqtt_url: str | None,
    seed: int,
    time_scale: float,
    data_dir: Path | None = None,
    orders_per_s: float = 8.0,
    servers: int = 1,
) -> SimulationReport:
    """Run a fleet simulation end to end and check the whole history."""
    return simulate(
        SimulationOptions(
            devices,
            orders,
            faults,
            database_url,
            mqtt_url,
            seed,
            time_scale,
            data_dir,
            orders_per_s=orders_per_s,
            servers=servers,
        )
    )


def simulate(options: SimulationOptions) -> SimulationReport:
    """Run a fleet simulation end to end and check the whole history."""
    if options.devices < 1 or options.orders < 0 or options.time_scale <= 0:
        raise ValueError("devices must be positive, orders not negative, time_scale positive")
    if options.devices > MAX_DEVICES or not 1 <= options.servers <= MAX_SERVERS:
        raise ValueError(f"at most {MAX_DEVICES} devices and 1 to {MAX_SERVERS} servers")
    if options.data_dir is None:
        import tempfile  # noqa: PLC0415 - only when no directory is given

        with tempfile.TemporaryDirectory(prefix="roompay-simulate-") as tmp:
            return _simulate(options, Path(tmp))
    options.data_dir.mkdir(parents=True, exist_ok=True)
    return _simulate(options, options.data_dir.resolve())


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _cleanup() -> Iterator[list[Callable[[], None]]]:
    """Run the registered stops in reverse order, whatever happens."""
    stops: list[Callable[[], None]] = []
    try:
        yield stops
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception:
                log.exception("cleanup step failed")


def _simulate(options: SimulationOptions, data_dir: Path) -> SimulationReport:
    started = time.monotonic()
    rng = random.Random(options.seed)  # noqa: S311 - reproducible simulation, not security
    database_url = options.database_url or f"sqlite:///{data_dir / 'roompay.db'}"
    topic_root = options.topic_root or f"sim{uuid.uuid4().hex[:8]}/v1"
    notes: list[str] = []
    stopping = threading.Event()
    with _cleanup() as stops:
        brokers, proxy, device_endpoint, server_mqtt = _mqtt_setup(options, rng, stops)
        clock = OffsetClock()
        sandbox = _SandboxServer(data_dir / "sandbox", clock, _free_port())
        merchant = sandbox_merchant_settings(
            data_dir / "merchant", sandbox.sandbox, sandbox.base_url
        )
        sandbox.start()
        stops.append(sandbox.stop)

        upgrade(database_url)
        prefix = f"S{uuid.uuid4().hex[:4].upper()}-"
        hotel_id, codes = _seed(database_url, options.devices, prefix)

        ports = [_free_port() for _ in range(options.servers)]
        env = _server_env(data_dir, database_url, server_mqtt, topic_root, merchant)
        servers = _start_servers(env, ports, data_dir, stops)
        stops.append(stopping.set)

        fleet = Fleet(
            codes,
            device_endpoint,
            topic_root,
            data_dir / "devices",
            options.time_scale,
            SECRET_KEY,
            per_worker=options.devices_per_worker,
        )
        stops.append(fleet.close)
        fleet.start()
        if proxy is not None:
            # Off while the fleet boots: a dropped boot message costs an agent its start timeout.
            proxy.faulty = True

        plans = plan_orders(options.orders, options.devices, options.faults, options.seed)
        run = _Run(
            sandbox_url=sandbox.base_url,
            fleet=fleet,
            programs=_programs_by_kind(),
            queue=deque((plan, 0) for plan in plans),
            stopping=stopping,
            deadline=time.monotonic() + options.max_duration_s,
            orders_per_s=options.orders_per_s,
        )
        chaos_done = threading.Event()
        if options.faults:
            restart_broker = _broker_restarter(brokers, proxy)
            chaos = threading.Thread(
                target=_chaos,
                args=(run, options.orders, servers[0], restart_broker, chaos_done),
                name="chaos",
                daemon=True,
            )
            chaos.start()
        else:
            chaos_done.set()
        _run_guests(run, codes, [f"http://127.0.0.1:{port}" for port in ports])
        chaos_done.wait(120)
        if proxy is not None:
            run.faults[FaultKind.MQTT_DROP.value] = proxy.dropped
            run.faults[FaultKind.MQTT_DELAY.value] = proxy.delayed
        outcome = _wind_down(run, database_url, hotel_id, servers, notes)
        if options.faults:
            run.faults[FaultKind.DEVICE_REBOOT.value] = outcome.power_cuts
        history = _collect(database_url, hotel_id, list(outcome.starts), merchant, clock, notes)
        return _report(options, database_url, run, history, notes, time.monotonic() - started)


def _wind_down(
    run: _Run,
    database_url: str,
    hotel_id: int,
    servers: list[_ServerProcess],
    notes: list[str],
) -> FleetOutcome:
    """Let the orders settle, then stop the appliances and the servers; what did the fleet do."""
    if not _wait_settled(database_url, hotel_id, SETTLE_WAIT_S):
        notes.append(f"not every order settled within {SETTLE_WAIT_S:.0f} s after the guests")
    run.stopping.set()
    run.fleet.halt()
    for thread in list(run.threads):
        thread.join(10)
    outcome = run.fleet.finish()
    for server in servers:
        server.stop()
    notes.append(
        f"{len(run.fleet.appliances)} appliances in {run.fleet.workers} worker process(es),"
        f" {len(servers)} server process(es)"
    )
    return outcome


def _report(
    options: SimulationOptions,
    database_url: str,
    run: "_Run",
    history: History,
    notes: list[str],
    duration_s: float,
) -> SimulationReport:
    violations, leaks = check_history(history)
    outcomes = _outcomes(history)
    if outcomes.get(STUCK_NO_QR):
        notes.append(
            f"{outcomes[STUCK_NO_QR]} order(s) stuck in awaiting_payment: the server was killed"
            " between writing the order and storing its QR; the unpaid sweep skips orders"
            " without a QR and a retry with the same Idempotency-Key does not finish them"
        )
    notes.extend(run.notes)
    if run.unplaced:
        outcomes["not placed (appliance never free)"] = run.unplaced
    kinds = list(FaultKind) if options.faults else []
    return SimulationReport(
        backend=f"{database_url.split(':', 1)[0].split('+', maxsplit=1)[0]}"
        f" + {'embedded broker' if options.mqtt_url is None else options.mqtt_url}",
        devices=options.devices,
        orders_requested=options.orders,
        orders_placed=len(run.placed),
        seed=options.seed,
        faults=options.faults,
        outcomes=outcomes,
        faults_injected={kind.value: run.faults.get(kind.value, 0) for kind in kinds},
        invariants={
            inv.name.lower(): sum(1 for v in violations if v.invariant is inv) for inv in Invariant
        },
        violations=violations,
        leaks=leaks,
        notes=notes,
        duration_s=round(duration_s, 2),
    )


def _mqtt_setup(
    options: SimulationOptions, rng: random.Random, stops: list[Callable[[], None]]
) -> tuple[list[BrokerProcess], "_MqttProxy | None", MqttEndpoint, str]:
    """The broker (ours unless a URL is given) and, with faults, the proxy in front of it."""
    brokers: list[BrokerProcess] = []
    if options.mqtt_url is None:
        brokers.append(BrokerProcess())
        brokers[0].start()
        stops.append(lambda: _stop_broker(brokers))
        upstream = brokers[0].endpoint
    else:
        upstream = parse_mqtt_url(options.mqtt_url)
    proxy: _MqttProxy | None = None
    if options.faults:
        proxy = _MqttProxy(upstream, rng)
        proxy.start()
        stops.append(proxy.stop)
        device_endpoint = MqttEndpoint(host="127.0.0.1", port=proxy.device_port)
        server_mqtt = f"mqtt://127.0.0.1:{proxy.server_port}"
    else:
        device_endpoint = upstream
        server_mqtt = options.mqtt_url or brokers[0].url
    return brokers, proxy, device_endpoint, server_mqtt


def _programs_by_kind() -> dict[ApplianceKind, list[Program]]:
    """Each kind's programs, shortest first."""
    programs: dict[ApplianceKind, list[Program]] = defaultdict(list)
    for program in default_programs():
        programs[program.kind].append(program)
    for kind_programs in programs.values():
        kind_programs.sort(key=lambda p: p.duration_s)
    return programs


def _start_servers(
    env: dict[str, str], ports: list[int], data_dir: Path, stops: list[Callable[[], None]]
) -> list[_ServerProcess]:
    """Start one server process per port, all on the same database and broker."""
    servers = []
    for index, port in enumerate(ports):
        # Each server names the next one as its public address: with several servers,
        # a payment's notifications reach another process than the one that took its checkout.
        public = {"ROOMPAY_PUBLIC_BASE_URL": f"http://127.0.0.1:{ports[(index + 1) % len(ports)]}"}
        name = f"server{index + 1}" if index else "server"
        server = _ServerProcess(env | public, port, data_dir, name)
        stops.append(server.stop)
        servers.append(server)
    for server in servers:
        server.start()
    return servers


def _server_env(
    data_dir: Path,
    database_url: str,
    mqtt_url: str,
    topic_root: str,
    merchant: dict[str, Any],
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMPAY_")}
    return env | {
        "ROOMPAY_DATA_DIR": str(data_dir),
        "ROOMPAY_DATABASE_URL": database_url,
        "ROOMPAY_MQTT_URL": mqtt_url,
        "ROOMPAY_MQTT_TOPIC_ROOT": topic_root,
        "ROOMPAY_SECRET_KEY": SECRET_KEY,
        # The provider sandbox is served by this process, not the server: a killed
        # server must not take the provider's memory of trades and refunds with it.
        "ROOMPAY_SANDBOX_ENABLED": "false",
        **SERVER_TIMINGS,
        **{f"ROOMPAY_{name.upper()}": str(value) for name, value in merchant.items()},
    }


def _stop_broker(brokers: list[BrokerProcess]) -> None:
    # The list's broker, not the first one: a restart replaces it.
    brokers[0].stop()


def _seed(database_url: str, devices: int, prefix: str) -> tuple[int, list[str]]:
    engine = make_engine(database_url)
    try:
        with transaction(session_factory(engine)) as session:
            operator = ensure_operator(session, "roompay", "Roompay Appliances Co.")
            hotel = create_hotel(
                session, operator, f"sim-{prefix.lower().rstrip('-')}", "Simulated Hotel", devices
            )
            codes = place_devices(session, hotel, devices, code_prefix=prefix)
            return hotel.id, codes
    finally:
        engine.dispose()


def _run_guests(run: _Run, codes: list[str], base_urls: list[str]) -> None:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with contextlib.ExitStack() as clients:
        http = [
            clients.enter_context(httpx.Client(base_url=url, timeout=30, limits=limits))
            for url in base_urls
        ]
        for index in range(len(http)):
            _retrying(run, _Servers(http, index), lambda c: c.get("/readyz"), 30)
        # Guests spread over the servers, and move to another when theirs does not answer.
        guests = [
            threading.Thread(
                target=_guest_loop, args=(run, code, _Servers(http, index)), name=f"guest-{code}"
            )
            for index, code in enumerate(codes)
        ]
        for guest in guests:
            guest.start()
        for guest in guests:
            guest.join()


def _broker_restarter(brokers: list[BrokerProcess], proxy: _MqttProxy | None) -> Callable[[], str]:
    def restart() -> str:
        if brokers and proxy is not None:
            # The broker crashes and a new one takes over behind the proxy: the clients
            # come back without their sessions or retained messages, as after a restart.
            # (Stopping amqtt cleanly closes 200 sessions one by one: over 60 s under
            # load, with the fleet cut off all the while.)
            fresh = BrokerProcess()
            fresh.start()
            old, brokers[0] = brokers[0], fresh
            proxy.upstream = fresh.endpoint
            old.crash()
            proxy.outage(1.0)
            time.sleep(1.0)
            return "embedded broker crashed, a new one took over (sessions lost)"
        if proxy is not None:
            proxy.outage(1.5)
            time.sleep(1.5)
            return "every broker connection cut and refused for 1.5 s"
        return "no broker to restart"

    return restart


def _chaos(
    run: _Run,
    orders: int,
    server: _ServerProcess,
    restart_broker: Callable[[], str],
    done: threading.Event,
) -> None:
    """Kill the server at about a third of the orders, restart the broker at two thirds."""
    try:
        steps: list[tuple[float, Callable[[], None]]] = [
            (0.35, lambda: _kill_server(run, server)),
            (0.65, lambda: _restart_broker(run, restart_broker)),
        ]
        for share, step in steps:
            while not run.stopping.is_set():
                with run.lock:
                    reached = run.taken >= share * orders or not run.queue
                if reached:
                    break
                time.sleep(0.05)
            if run.stopping.is_set():
                return
            try:
                step()
            except Exception as exc:  # a failed fault must show in the report, not hide
                log.exception("chaos step failed")
                with run.lock:
                    run.notes.append(f"a fault could not be injected: {exc}")
    finally:
        done.set()


def _kill_server(run: _Run, server: _ServerProcess) -> None:
    server.kill()
    run.fault(FaultKind.SERVER_KILL)
    time.sleep(1.0)
    server.start()


def _restart_broker(run: _Run, restart: Callable[[], str]) -> None:
    restart()
    run.fault(FaultKind.BROKER_RESTART)


def _wait_settled(database_url: str, hotel_id: int, timeout_s: float) -> bool:
    engine = make_engine(database_url)
    sessions = session_factory(engine)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with sessions() as session:
                unsettled = session.scalar(
                    select(func.count())
                    .select_from(Order)
                    .where(
                        Order.hotel_id == hotel_id,
                        Order.status.not_in(TERMINAL),
                        # without its QR no guest can pay it, and nothing ever sweeps it
                        Order.qr_content.is_not(None),
                    )
                )
                open_refunds = session.scalar(
                    select(func.count())
                    .select_from(Refund)
                    .join(Order, Refund.order_id == Order.id)
                    .where(Order.hotel_id == hotel_id, Refund.status.in_(OPEN_REFUNDS))
                )
            if not unsettled and not open_refunds:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.25)
    finally:
        engine.dispose()


def _collect(
    database_url: str,
    hotel_id: int,
    starts: list[RunStart],
    merchant: dict[str, Any],
    clock: OffsetClock,
    notes: list[str],
) -> History:
    """Read the history from the database, the journals and the provider."""
    settings = Settings.model_validate(
        {"database_url": database_url, "secret_key": SECRET_KEY, **merchant}
    )
    runtime = Runtime(settings, build_providers(settings, clock), clock=clock)
    try:
        with runtime.ctx.sessions() as session:
            orders = list(
                session.scalars(
                    select(Order).where(Order.hotel_id == hotel_id).order_by(Order.created_at)
                )
            )
            ids = [o.id for o in orders]
            refunds: dict[str, list[Refund]] = defaultdict(list)
            started_runs: Counter[str] = Counter()
            for chunk in _chunks(ids, 500):
                for refund in session.scalars(select(Refund).where(Refund.order_id.in_(chunk))):
                    refunds[refund.order_id].append(refund)
                for order_id, _run_id in session.execute(
                    select(RunEventRecord.order_id, RunEventRecord.run_id)
                    .where(RunEventRecord.order_id.in_(chunk), RunEventRecord.event == "started")
                    .distinct()
                ):
                    started_runs[order_id] += 1
            facts = [
                OrderFacts(
                    order_id=o.id,
                    status=o.status,
                    amount_fen=o.amount_fen,
                    paid_fen=(
                        (o.paid_amount_fen or o.amount_fen) if o.paid_at is not None else None
                    ),
                    flag=o.flag,
                    started_runs_in_db=started_runs[o.id],
                    refunds=tuple(_refund_facts(runtime, o, r) for r in refunds[o.id]),
                    has_qr=o.qr_content is not None,
                )
                for o in orders
            ]
            unbalanced = unbalanced_entries(session)
            ledger_sum = sum(account_balances(session).values())
            days = sorted(
                set(session.scalars(select(LedgerEntry.booked_on).distinct()))
                | {beijing_day(o.created_at) for o in orders}
            )
        reconciliation = _reconcile(runtime, clock, days, notes)
        return History(facts, list(starts), unbalanced, ledger_sum, reconciliation)
    finally:
        runtime.stop()


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _refund_facts(runtime: Runtime, order: Order, refund: Refund) -> RefundFacts:
    state: str | None = None
    amount: int | None = None
    if refund.status in ("refunded", "needs_attention", "processing"):
        try:
            outcome = runtime.ctx.provider(Wallet(order.wallet)).query_refund(
                order.id, refund.refund_key
            )
            state, amount = outcome.state.value, outcome.amount_fen
        except PaymentError as exc:
            state = f"error: {exc}"
    return RefundFacts(
        refund.refund_key, refund.amount_fen, refund.status, refund.reason, state, amount
    )


def _reconcile(
    runtime: Runtime, clock: OffsetClock, days: list[date], notes: list[str]
) -> dict[str, list[str]] | None:
    """Reconcile each day of the run; the provider's clock moves to the next day first."""
    if not days:
        return {}
    # Bills exist for finished Beijing days only; everything else has stopped by now.
    next_day = days[-1] + timedelta(days=1)
    opens = datetime(next_day.year, next_day.month, next_day.day, 2, 0, tzinfo=UTC)
    ahead = (opens - clock.now()).total_seconds()
    if ahead > 0:
        clock.advance(ahead)
    notes.append(
        f"reconciled {', '.join(d.isoformat() for d in days)} after moving the provider's"
        " clock to the next day (bills exist for finished days only)"
    )
    found: dict[str, list[str]] = {}
    for day in days:
        try:
            reports = reconcile_day(runtime.ctx, day, rerun=True)
        except Exception as exc:  # reported as a difference, not a crash
            found[day.isoformat()] = [f"reconciliation failed: {exc}"]
            continue
        for report in reports:
            found[f"{day.isoformat()} {report.wallet}"] = [
                f"{line.outcome.value} {line.kind} {line.refund_key or line.out_trade_no}"
                f" ours={line.ours} theirs={line.theirs} {line.note}"
                for line in report.lines
                if line.outcome.value != "matched"
            ]
    return found


STUCK_UNPAID = "stuck unpaid (never expired)"
STUCK_NO_QR = "stuck unpaid, no QR stored (server died mid-checkout)"


def _outcomes(history: History) -> dict[str, int]:
    ran = {s.order_id for s in history.starts}
    outcomes: Counter[str] = Counter()
    for order in history.orders:
        did_run = order.order_id in ran or order.started_runs_in_db > 0
        if order.status == "expired":
            outcomes["expired unpaid"] += 1
        elif order.status == "completed":
            outcomes["ran, kept in full"] += 1
        elif order.status == "partially_refunded":
            outcomes["ran, unused share refunded"] += 1
        elif order.status == "refunded":
            outcomes["ran briefly, refunded" if did_run else "never ran, refunded"] += 1
        elif order.paid_fen is None:
            outcomes[STUCK_UNPAID if order.has_qr else STUCK_NO_QR] += 1
        else:
            outcomes[f"unsettled: {order.status}"] += 1
    return dict(outcomes)


# --- the command --------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add `roompay simulate` to the command line."""

    @app.command()
    def simulate(
        devices: Annotated[
            int, typer.Option(min=1, max=MAX_DEVICES, help="Simulated appliances.")
        ] = 20,
        orders: Annotated[int, typer.Option(min=0, max=100_000, help="Guest orders.")] = 100,
        faults: Annotated[bool, typer.Option("--faults", help="Inject faults (seeded).")] = False,
        database_url: Annotated[
            str | None, typer.Option(help="Database (default: SQLite in a fresh data dir).")
        ] = None,
        mqtt_url: Annotated[
            str | None, typer.Option(help="Broker (default: an embedded broker of our own).")
        ] = None,
        seed: Annotated[int, typer.Option(help="Seed of the guests' and faults' plan.")] = 1,
        time_scale: Annotated[
            float, typer.Option(min=1.0, help="Appliance seconds per real second.")
        ] = 100_000.0,
        data_dir: Annotated[
            Path | None, typer.Option(help="Keep the run's data here (default: a temp dir).")
        ] = None,
        json_file: Annotated[
            Path | None, typer.Option("--json", help="Also write the report here.")
        ] = None,
        rate: Annotated[
            float, typer.Option(min=0.1, help="Guests arriving per second, across the fleet.")
        ] = 8.0,
        servers: Annotated[
            int,
            typer.Option(
                min=1,
                max=MAX_SERVERS,
                help="Server processes on the same database and broker, all dispatching;"
                " with --faults the first is killed and restarted mid-run.",
            ),
        ] = 1,
    ) -> None:
        """Run a fleet of simulated appliances and guests against a real server; check it all."""
        from roompay.logs import configure_logging  # noqa: PLC0415

        configure_logging("WARNING")
        report = run_simulation(
            devices,
            orders,
            faults,
            database_url,
            mqtt_url,
            seed,
            time_scale,
            data_dir,
            rate,
            servers,
        )
        for line in summary_lines(report):
            typer.echo(line)
        if json_file is not None:
            json_file.write_text(json.dumps(report.to_json(), indent=2, default=str))
        if not report.ok:
            raise typer.Exit(1)


__all__ = [
    "STUCK_NO_QR",
    "FaultKind",
    "History",
    "Invariant",
    "OrderFacts",
    "RefundFacts",
    "RunStart",
    "SimulationOptions",
    "SimulationReport",
    "Violation",
    "check_history",
    "plan_orders",
    "register",
    "run_simulation",
    "simulate",
    "summary_lines",
]

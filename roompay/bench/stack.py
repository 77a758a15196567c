"""Everything a benchmark run stands on, started and torn down in one place.

- a scratch database (a new PostgreSQL database next to the one given, dropped at
  the end; or SQLite in a temporary directory with `--embedded`);
- the broker (Mosquitto as configured on the machine; or the embedded broker in a
  child process of its own, so its memory is its own);
- the provider sandbox, served in a thread of this process and holding its notifies,
  so the benchmark decides when each is delivered and signs it just before;
- the roompay server as a separate `python -m roompay serve` process;
- the baseline server (`roompay.bench.baseline`) as another process;
- the bare appliances, in child processes (`roompay.bench.devices`).
"""

import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI
from psycopg import sql
from sqlalchemy import text

from roompay.bench.baseline import TABLE_SQL, BaselineConfig
from roompay.bench.cpu import DatabaseProcesses, ProcessGroups
from roompay.bench.devices import FleetSpec, run_fleet
from roompay.bench.http import BareHttp
from roompay.demo import sandbox_merchant_settings
from roompay.payments.wechatpay.wire import decrypt_resource
from roompay.protocol.mqtt_url import parse_mqtt_url
from roompay.sandbox.app import Sandbox
from roompay.services.auth import Role, create_user
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import make_engine, session_factory, transaction, upgrade

SECRET_KEY = "bench-secret-key-0123456789abcdef0123456789"  # noqa: S105 - a throwaway bench server
DEVICES_PER_PROCESS = 5000
STAFF_USER = "bench-admin"
STAFF_PASSWORD = "bench-password-0123"  # noqa: S105 - a throwaway bench user
# The first program of each kind (place_devices cycles through the kinds in this order).
PROGRAM_OF_KIND = {
    "clothes_dryer": "dry30",
    "air_purifier": "air8h",
    "water_purifier": "water1",
    "aroma_diffuser": "aroma1h",
}

STAGES = (
    ("paid", "command_queued"),
    ("command_queued", "command_sent"),
    ("command_sent", "command_accepted"),
    ("command_accepted", "started"),
)
"""The steps of an order the server records, in order; `stages` reports the gaps."""

ACCEPTED_TRIGGER = """
CREATE OR REPLACE FUNCTION bench_accepted() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('bench_accepted', NEW.order_id);
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER bench_accepted AFTER UPDATE OF status ON commands
  FOR EACH ROW WHEN (NEW.status = 'accepted' AND OLD.status <> 'accepted')
  EXECUTE FUNCTION bench_accepted();
"""


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """The resident memory of a process, in MB (VmRSS of /proc/<pid>/status)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def mosquitto_pid(port: int) -> int | None:
    """The pid of the Mosquitto listening on `port` (the system's, via pgrep)."""
    found = subprocess.run(
        ["pgrep", "-x", "mosquitto"],  # noqa: S607 - pgrep from PATH
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    pids = [int(pid) for pid in found]
    if len(pids) > 1:
        pid_file = Path("/run/mosquitto/mosquitto.pid")
        if port == 1883 and pid_file.exists():
            return int(pid_file.read_text().strip())
    return pids[0] if pids else None


class CheckoutRefusedError(RuntimeError):
    """The server refused a checkout with 409 (the appliance is busy or offline)."""


@dataclass
class Prepared:
    """A checked-out, paid order whose payment notify is held until the bench sends it."""

    order_id: str
    device: str
    body: bytes


class _SandboxServer:
    """The provider sandbox on its own loopback port, in a thread of this process."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.sandbox = Sandbox(state_dir, hold_notifies=True)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        app = FastAPI(title="roompay provider sandbox (bench)")
        app.include_router(self.sandbox.router())
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
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


OWN_MOSQUITTO = "own"
"""Start a Mosquitto of our own, configured as `roompay broker mosquitto-config` does."""

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
# As in production (roompay/iot/mosquitto.py): without it Nagle's algorithm holds
# small packets back, about 40 ms per hop.
set_tcp_nodelay true
max_queued_messages 100000
persistence false
log_dest file {log}
log_type error
log_type warning
"""


@dataclass
class _Mosquitto:
    process: "subprocess.Popen[bytes]"
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _start_mosquitto(work_dir: Path) -> _Mosquitto:
    port = free_port()
    conf = work_dir / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port, log=work_dir / "mosquitto.log"))
    process = subprocess.Popen(  # noqa: S603 - the machine's mosquitto, our config
        ["mosquitto", "-c", str(conf)],  # noqa: S607 - mosquitto from PATH
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited; see {work_dir / 'mosquitto.log'}")
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return _Mosquitto(process, port)
        except OSError:
            await asyncio.sleep(0.05)
    process.kill()
    raise RuntimeError("mosquitto did not listen within 10 s")


def _serve_embedded_broker(port: int, ready: Connection) -> None:
    from roompay.iot.broker import EmbeddedBroker  # noqa: PLC0415

    broker = EmbeddedBroker(port=port)
    broker.start()
    ready.send("ready")
    signal.sigwait({signal.SIGTERM})
    broker.stop()


class _Process:
    """A child process of ours with a readiness URL and a log file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                command, env=env, stdout=log_file, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self, port: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.log_path.stem} exited; see {self.log_path}")
            http = BareHttp("127.0.0.1", port)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
                status, _ = await http.send("GET", "/readyz")
                await http.close()
                if status == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.log_path.stem} not ready in {timeout_s} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@dataclass
class Fleet:
    """Bare appliances in one or more child processes."""

    processes: list[tuple[BaseProcess, Connection]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def start(self, specs: list[FleetSpec]) -> float:
        """Start one child per spec; return once every appliance is online (seconds taken)."""
        spawn = multiprocessing.get_context("spawn")
        started = time.perf_counter()
        new = []
        for spec in specs:
            parent, child = spawn.Pipe()
            process = spawn.Process(target=run_fleet, args=(spec, child), daemon=True)
            process.start()
            new.append((process, parent))
        for _process, conn in new:
            kind, detail = conn.recv()
            if kind != "ready":
                raise RuntimeError(f"a fleet process failed: {detail}")
        self.processes += new
        return time.perf_counter() - started

    def pids(self) -> list[int]:
        """The fleet's processes."""
        return [process.pid for process, _conn in self.processes if process.pid is not None]

    def ask(self, request: str) -> list[Any]:
        """Send a request to every fleet process and collect the answers."""
        for _process, conn in self.processes:
            conn.send((request,))
        answers = []
        for _process, conn in self.processes:
            kind, detail = conn.recv()
            if kind == "failed":
                raise RuntimeError(f"a fleet process failed: {detail}")
            answers.append(detail)
        return answers

    def stats(self) -> dict[str, Any]:
        """Counts of every fleet process, summed; `started` maps order id to its start time."""
        merged: dict[str, Any] = {"started": {}, "errors": []}
        for answer in self.ask("stats"):
            for key, value in answer.items():
                if key == "started":
                    merged["started"].update(value)
                elif key == "errors":
                    merged["errors"] += value
                else:
                    merged[key] = merged.get(key, 0) + value
        return merged

    def stop(self) -> None:
        """Stop every fleet process (each clears its retained births first)."""
        self.final = self._quit()

    def _quit(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            for answer in self.ask("quit"):
                for key, value in answer.items():
                    if isinstance(value, int):
                        merged[key] = merged.get(key, 0) + value
        for process, _conn in self.processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
        self.processes = []
        return merged


@dataclass
class Stack:
    """The running pieces of one benchmark run."""

    work_dir: Path
    database_url: str  # SQLAlchemy URL, given to the server
    backend: str
    mqtt_host: str
    mqtt_port: int
    topic_root: str
    base_root: str
    sandbox: _SandboxServer
    merchant: dict[str, Any]
    codes: list[str]
    programs: dict[str, str]
    server: _Process
    server_port: int
    baseline: _Process
    baseline_port: int
    broker_pid: int | None
    fleet: Fleet
    stops: list[Callable[[], None]]
    database_processes: Callable[[], list[int]] = list
    waiters: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    stuck_running: int = 0  # appliances the server still had running after their runs ended
    refused_checkouts: int = 0
    listener: asyncio.Task[None] | None = None

    def process_groups(self, server_pid: int) -> ProcessGroups:
        """This run's processes by component, with `server_pid` as the server measured."""
        return ProcessGroups(
            server=server_pid,
            database=self.database_processes,
            broker=self.broker_pid,
            appliances=self.fleet.pids,
            load=os.getpid(),
        )

    @property
    def plain_database_url(self) -> str:
        """The database as libpq (or sqlite:///) understands it."""
        return self.database_url.replace("postgresql+psycopg://", "postgresql://")

    def fleet_specs(self, codes: list[str], heartbeat_s: float) -> list[FleetSpec]:
        """Fleet process specs for these appliances, `DEVICES_PER_PROCESS` to a process."""
        return [
            FleetSpec(
                host=self.mqtt_host,
                port=self.mqtt_port,
                root=self.topic_root,
                base_root=self.base_root,
                codes=codes[i : i + DEVICES_PER_PROCESS],
                heartbeat_s=heartbeat_s,
            )
            for i in range(0, len(codes), DEVICES_PER_PROCESS)
        ]

    # --- orders --------------------------------------------------------------------------

    async def checkout(self, http: BareHttp, code: str, qr: bool) -> tuple[str, str, float]:
        """Check out one order over HTTP (and render its QR); return (order id, QR, ms)."""
        body = json.dumps(
            {"device": code, "program": self.programs[code], "wallet": "wechat"}
        ).encode()
        started = time.perf_counter()
        status, answer = await http.send(
            "POST", "/api/v1/checkout", body, {"Content-Type": "application/json"}
        )
        if status == 409:
            raise CheckoutRefusedError(f"checkout refused: {answer[:300]!r}")
        if status != 201:
            raise RuntimeError(f"checkout refused: {status} {answer[:300]!r}")
        order = json.loads(answer)
        if qr:
            status, svg = await http.send("GET", f"/api/v1/orders/{order['order_id']}/qr.svg")
            if status != 200 or not svg.startswith(b"<svg"):
                raise RuntimeError(f"QR rendering failed: {status}")
        return order["order_id"], order["qr"], (time.perf_counter() - started) * 1000

    async def prepare(
        self, codes: list[str], concurrency: int = 16
    ) -> tuple[list[Prepared], list[float]]:
        """Check out and pay one order per appliance; hold each notify. Checkout times in ms."""
        results: list[tuple[str, str, str, float]] = []
        queue = list(reversed(codes))

        async def worker() -> None:
            http = BareHttp("127.0.0.1", self.server_port)
            pay = BareHttp("127.0.0.1", self.sandbox.port)
            while queue:
                code = queue.pop()
                try:
                    order_id, qr, ms = await self.checkout(http, code, qr=concurrency == 1)
                except CheckoutRefusedError:
                    # An appliance the server still believes busy: counted, and left out.
                    self.refused_checkouts += 1
                    continue
                status, answer = await pay.send(
                    "POST",
                    "/sandbox/pay",
                    json.dumps({"qr": qr}).encode(),
                    {"Content-Type": "application/json"},
                )
                if status != 200:
                    raise RuntimeError(f"sandbox pay refused: {status} {answer[:200]!r}")
                results.append((order_id, code, qr, ms))
            await http.close()
            await pay.close()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        bodies = await self._held_bodies({order_id for order_id, *_ in results})
        prepared = [Prepared(order_id, code, bodies[order_id]) for order_id, code, _, _ in results]
        return prepared, [ms for *_, ms in results]

    async def _held_bodies(self, order_ids: set[str], timeout_s: float = 30.0) -> dict[str, bytes]:
        apiv3_key = self.merchant["wechat_apiv3_key"]
        held = self.sandbox.sandbox.held_notifies
        found: dict[str, bytes] = {}
        seen = 0
        deadline = time.monotonic() + timeout_s
        while len(found) < len(order_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(found)}/{len(order_ids)} notifies were held")
            # The sandbox appends from its own thread: take a slice, then count what was taken.
            batch = held[seen:]
            seen += len(batch)
            for request in batch:
                resource = json.loads(request.content)["resource"]
                trade = json.loads(
                    decrypt_resource(
                        apiv3_key,
                        resource["nonce"],
                        resource["associated_data"],
                        resource["ciphertext"],
                    )
                )
                if trade["out_trade_no"] in order_ids:
                    found.setdefault(trade["out_trade_no"], request.content)
            await asyncio.sleep(0.01)
        return found

    def sign(self, body: bytes) -> dict[str, str]:
        """Fresh platform signature headers for a notify body (valid for 5 minutes)."""
        return self.sandbox.sandbox.wechatpay.sign_notify(body)

    # --- acceptance ---------------------------------------------------------------------

    def expect(self, order_id: str) -> "asyncio.Future[float]":
        """A future set to the monotonic time the server records the device's acceptance."""
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[order_id] = waiter
        return waiter

    def _accepted(self, order_id: str) -> None:
        waiter = self.waiters.pop(order_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(time.perf_counter())

    async def _listen_postgres(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.plain_database_url, autocommit=True
        ) as conn:
            await conn.execute("LISTEN bench_accepted")
            async for note in conn.notifies():
                self._accepted(note.payload)

    async def _poll_sqlite(self) -> None:
        path = self.database_url.removeprefix("sqlite:///")
        db = sqlite3.connect(path, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=30000")
        try:
            while True:
                pending = list(self.waiters)
                if pending:
                    query = (
                        "SELECT order_id FROM commands WHERE status = 'accepted'"  # noqa: S608 - placeholders only
                        f" AND order_id IN ({','.join('?' * len(pending))})"
                    )
                    rows = await asyncio.to_thread(db.execute(query, pending).fetchall)
                    for (order_id,) in rows:
                        self._accepted(order_id)
                await asyncio.sleep(0.002)
        finally:
            db.close()

    def start_listening(self) -> None:
        """Start noticing acceptances: LISTEN on PostgreSQL, polling on SQLite."""
        listen = self._listen_postgres if self.backend == "postgresql" else self._poll_sqlite
        self.listener = asyncio.get_running_loop().create_task(listen())

    async def running_devices(self) -> int:
        """How many appliances the server believes are running."""
        return int(
            await asyncio.to_thread(
                self._scalar, "SELECT count(*) FROM devices WHERE state = 'running'"
            )
        )

    def _scalar(self, query: str) -> Any:
        if self.backend == "postgresql":
            with psycopg.connect(self.plain_database_url) as conn:
                row = conn.execute(query.encode()).fetchone()
        else:
            with contextlib.closing(
                sqlite3.connect(self.database_url.removeprefix("sqlite:///"))
            ) as db:
                row = db.execute(query).fetchone()
        return None if row is None else row[0]

    async def stages(self, order_ids: list[str]) -> dict[str, float]:
        """Median milliseconds between the server's recorded steps of these orders.

        From `order_events` (server clock): where the time between a notify and the
        recorded acceptance goes.
        """
        rows = await asyncio.to_thread(self._events, order_ids)
        steps: dict[str, dict[str, datetime]] = {}
        for order_id, event, raw in rows:
            at = datetime.fromisoformat(raw) if isinstance(raw, str) else raw
            steps.setdefault(order_id, {}).setdefault(event, at)
        figures = {}
        for first, then in STAGES:
            gaps = [
                (s[then] - s[first]).total_seconds() * 1000
                for s in steps.values()
                if first in s and then in s
            ]
            if gaps:
                figures[f"{first}->{then}"] = round(statistics.median(gaps), 2)
        return figures

    def _events(self, order_ids: list[str]) -> list[tuple[str, str, Any]]:
        events = [first for first, _ in STAGES] + [STAGES[-1][1]]
        if self.backend == "postgresql":
            with psycopg.connect(self.plain_database_url) as conn:
                return list(
                    conn.execute(
                        "SELECT order_id, event, at FROM order_events"
                        " WHERE order_id = ANY(%s) AND event = ANY(%s) ORDER BY id",
                        (order_ids, events),
                    ).fetchall()
                )
        with contextlib.closing(
            sqlite3.connect(self.database_url.removeprefix("sqlite:///"))
        ) as db:
            found = []
            for start in range(0, len(order_ids), 500):
                chunk = order_ids[start : start + 500]
                query = (
                    "SELECT order_id, event, at FROM order_events"  # noqa: S608 - placeholders only
                    f" WHERE order_id IN ({','.join('?' * len(chunk))}) ORDER BY id"
                )
                found += [row for row in db.execute(query, chunk) if row[1] in events]
            return found

    async def wait_online(self, count: int, timeout_s: float = 120.0) -> None:
        """Return once the server has seen at least `count` appliances online."""
        deadline = time.monotonic() + timeout_s
        query = "SELECT count(*) FROM devices WHERE online"
        while int(await asyncio.to_thread(self._scalar, query)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} appliances online after {timeout_s} s")
            await asyncio.sleep(0.2)

    async def end_runs(self, stall_s: float = 30.0) -> None:
        """End every run on the appliances; return once the server has them all idle.

        The server works through the `ended` events at its own pace; only a backlog
        that stops shrinking for `stall_s` is an error.
        """
        await asyncio.to_thread(self.fleet.ask, "end")
        progress = await self._run_progress()
        since = time.monotonic()
        while progress[0] > 0:
            await asyncio.sleep(0.2)
            now = await self._run_progress()
            # Progress: fewer appliances running, or more run events stored (a backlog of
            # `started` events may keep the count of running appliances up for a while).
            if now[0] < progress[0] or now[1] > progress[1]:
                since = time.monotonic()
            elif time.monotonic() - since > stall_s:
                self.stuck_running = max(self.stuck_running, now[0])
                return
            progress = now

    async def _run_progress(self) -> tuple[int, int]:
        stored = int(await asyncio.to_thread(self._scalar, "SELECT count(*) FROM run_events"))
        return await self.running_devices(), stored

    async def close(self) -> None:
        """Stop everything, last started first."""
        if self.listener is not None:
            self.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.listener
        for stop in reversed(self.stops):
            with contextlib.suppress(Exception):
                stop()


def _create_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    plain = admin_url.replace("postgresql+psycopg://", "postgresql://")
    name = f"roompay_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = plain.rsplit("/", 1)[0]

    def drop() -> None:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    return f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}", drop


def _seed(database_url: str, devices: int) -> tuple[list[str], dict[str, str]]:
    engine = make_engine(database_url)
    try:
        with transaction(session_factory(engine)) as session:
            operator = ensure_operator(session, "roompay", "Roompay Appliances Co.")
            hotel = create_hotel(session, operator, "bench", "Bench Hotel", min(devices, 2000))
            codes = place_devices(session, hotel, devices, code_prefix="B")
            create_user(session, STAFF_USER, STAFF_PASSWORD, Role.ADMIN, None, datetime.now(UTC))
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT code, kind FROM devices")).all()
        kinds = {str(code): str(kind) for code, kind in rows}
        return codes, {code: PROGRAM_OF_KIND[kinds[code]] for code in codes}
    finally:
        engine.dispose()


def _prepare_database(database_url: str, backend: str) -> None:
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    if backend == "postgresql":
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(ACCEPTED_TRIGGER.encode())
            conn.execute(TABLE_SQL.encode())
    else:
        with contextlib.closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
            db.execute(TABLE_SQL)
            db.commit()


def _server_env(
    stack_dir: Path,
    database_url: str,
    mqtt_url: str,
    root: str,
    port: int,
    merchant: dict[str, Any],
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMPAY_")}
    return env | {
        "ROOMPAY_DATA_DIR": str(stack_dir),
        "ROOMPAY_DATABASE_URL": database_url,
        "ROOMPAY_MQTT_URL": mqtt_url,
        "ROOMPAY_MQTT_TOPIC_ROOT": root,
        "ROOMPAY_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ROOMPAY_SECRET_KEY": SECRET_KEY,
        "ROOMPAY_SANDBOX_ENABLED": "false",
        # Held notifies are paid trades: an active query would find them before the
        # bench delivers the notify. Orders prepared early must not expire either.
        "ROOMPAY_QUERY_AFTER_S": "86400",
        "ROOMPAY_CHECKOUT_TTL_S": "7200",
        **{f"ROOMPAY_{name.upper()}": str(value) for name, value in merchant.items()},
    }


async def open_stack(
    work_dir: Path,
    *,
    embedded: bool,
    postgres_url: str,
    mqtt_url: str,
    devices: int,
    first_fleet: int,
    heartbeat_s: float,
) -> Stack:
    """Start everything; the first `first_fleet` appliances are connected already."""
    stops: list[Callable[[], None]] = []
    try:
        return await _open(
            work_dir, embedded, postgres_url, mqtt_url, devices, first_fleet, heartbeat_s, stops
        )
    except BaseException:
        for stop in reversed(stops):
            with contextlib.suppress(Exception):
                stop()
        raise


async def _storage_and_broker(
    work_dir: Path,
    embedded: bool,
    postgres_url: str,
    mqtt_url: str,
    stops: list[Callable[[], None]],
) -> tuple[str, str, str, int | None]:
    """The database URL, its backend, the broker URL and the broker's pid."""
    if embedded:
        database_url = f"sqlite:///{work_dir / 'roompay.db'}"
        spawn = multiprocessing.get_context("spawn")
        port = free_port()
        parent, child = spawn.Pipe()
        broker = spawn.Process(target=_serve_embedded_broker, args=(port, child), daemon=True)
        broker.start()
        if not parent.poll(30) or parent.recv() != "ready":
            raise RuntimeError("the embedded broker did not start")

        def stop_broker() -> None:
            os.kill(broker.pid or 0, signal.SIGTERM)
            broker.join(10)

        stops.append(stop_broker)
        return database_url, "sqlite", f"mqtt://127.0.0.1:{port}", broker.pid
    database_url, drop = _create_database(postgres_url)
    stops.append(drop)
    if mqtt_url == OWN_MOSQUITTO:
        mosquitto = await _start_mosquitto(work_dir)
        stops.append(mosquitto.stop)
        return database_url, "postgresql", f"mqtt://127.0.0.1:{mosquitto.port}", mosquitto.pid
    return database_url, "postgresql", mqtt_url, mosquitto_pid(parse_mqtt_url(mqtt_url).port)


def _database_processes(
    libpq_url: str, backend: str, stops: list[Callable[[], None]]
) -> Callable[[], list[int]]:
    """The database's processes for the CPU meter (none on SQLite: it runs in the server)."""
    if backend != "postgresql":
        return list
    processes = DatabaseProcesses(libpq_url)
    stops.append(processes.close)
    return processes


async def _open(
    work_dir: Path,
    embedded: bool,
    postgres_url: str,
    mqtt_url: str,
    devices: int,
    first_fleet: int,
    heartbeat_s: float,
    stops: list[Callable[[], None]],
) -> Stack:
    database_url, backend, mqtt_url, broker_pid = await _storage_and_broker(
        work_dir, embedded, postgres_url, mqtt_url, stops
    )
    endpoint = parse_mqtt_url(mqtt_url)
    run_id = uuid.uuid4().hex[:8]
    root, base_root = f"bench{run_id}/v1", f"bench{run_id}/base"

    sandbox = _SandboxServer(work_dir / "sandbox", free_port())
    sandbox.start()
    stops.append(sandbox.stop)
    merchant = sandbox_merchant_settings(work_dir / "merchant", sandbox.sandbox, sandbox.base_url)

    await asyncio.to_thread(upgrade, database_url)
    _prepare_database(database_url, backend)
    codes, programs = await asyncio.to_thread(_seed, database_url, devices)

    server_port = free_port()
    env = _server_env(work_dir, database_url, mqtt_url, root, server_port, merchant)
    command = [sys.executable, "-m", "roompay", "serve", "--port", str(server_port)]
    server = _Process(command, env, work_dir / "server.log")
    stops.append(server.stop)

    baseline_port = free_port()
    plain_url = database_url.replace("postgresql+psycopg://", "postgresql://")
    config_path = work_dir / "baseline.json"
    BaselineConfig(
        port=baseline_port,
        database=plain_url,
        mqtt_host=endpoint.host,
        mqtt_port=endpoint.port,
        topic_root=base_root,
        platform_public_key_pem=Path(merchant["wechat_platform_public_key_path"]).read_text(),
        platform_public_key_id=merchant["wechat_platform_public_key_id"],
        apiv3_key=merchant["wechat_apiv3_key"],
    ).write(config_path)
    baseline = _Process(
        [sys.executable, "-m", "roompay.bench.baseline", str(config_path)],
        dict(os.environ),
        work_dir / "baseline.log",
    )
    stops.append(baseline.stop)
    await server.wait_ready(server_port)
    await baseline.wait_ready(baseline_port)

    fleet = Fleet()
    stack = Stack(
        work_dir=work_dir,
        database_url=database_url,
        backend=backend,
        mqtt_host=endpoint.host,
        mqtt_port=endpoint.port,
        topic_root=root,
        base_root=base_root,
        sandbox=sandbox,
        merchant=merchant,
        codes=codes,
        programs=programs,
        server=server,
        server_port=server_port,
        baseline=baseline,
        baseline_port=baseline_port,
        broker_pid=broker_pid,
        fleet=fleet,
        stops=stops,
        database_processes=_database_processes(plain_url, backend, stops),
    )
    # Stopped in reverse: the server goes first, then the fleet clears its retained births.
    stops.insert(stops.index(server.stop), fleet.stop)
    await asyncio.to_thread(fleet.start, stack.fleet_specs(codes[:first_fleet], heartbeat_s))
    stack.start_listening()
    return stack

"""A real roompay server for functional tests: uvicorn on a free loopback port.

Everything is the product's own wiring (`Runtime`, `create_app`, the sandbox); the
test only chooses the database, the broker and a unique topic root.
"""

import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import text

from roompay.clock import OffsetClock
from roompay.demo import sandbox_merchant_settings
from roompay.payments.factory import build_providers
from roompay.runtime import Runtime
from roompay.sandbox.app import Sandbox
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.settings import Settings
from roompay.store.db import transaction
from roompay.web.app import create_app

# Children before parents, so that SQLite's DELETEs respect the foreign keys.
# provider_fee_schedules is left alone: the migrations seed it.
TABLES = (
    "reconciliation_lines",
    "reconciliation_reports",
    "order_funds",
    "statement_entries",
    "statements",
    "ledger_lines",
    "ledger_entries",
    "run_events",
    "refunds",
    "commands",
    "payment_notices",
    "order_events",
    "audit_log",
    "orders",
    "users",
    "devices",
    "programs",
    "rooms",
    "hotel_contracts",
    "hotels",
    "operators",
)


class TamperingTransport(httpx.AsyncBaseTransport):
    """The sandbox's outgoing notifies, optionally altered on the way (a forger in between)."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.tamper: Callable[[httpx.Request], httpx.Request] | None = None
        # When set, notifies are held here instead of sent (the provider sees a 503).
        self.held: list[httpx.Request] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.held is not None:
            await request.aread()
            self.held.append(request)
            return httpx.Response(503, request=request)
        if self.tamper is not None:
            request = self.tamper(request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """A running server with its sandbox, and the hotel the test placed devices in."""

    runtime: Runtime
    clock: OffsetClock
    base_url: str
    mqtt_url: str
    device_codes: list[str]
    notify_wire: TamperingTransport

    @property
    def settings(self) -> Settings:
        """The server's settings."""
        return self.runtime.settings

    def client(self) -> httpx.Client:
        """An HTTP client for the server."""
        return httpx.Client(base_url=self.base_url, timeout=10)

    def table_counts(self) -> dict[str, int]:
        """Row counts of every table, to prove that a refused request wrote nothing."""
        with self.runtime.engine.connect() as conn:
            return {
                t: int(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()) for t in TABLES
            }


def wipe(runtime: Runtime) -> None:
    """Empty every table so that each test starts from nothing."""
    with runtime.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
        else:
            for table in TABLES:
                conn.execute(text(f"DELETE FROM {table}"))


def seed_hotel(runtime: Runtime, devices: int, prefix: str) -> list[str]:
    """A hotel with rooms, default programs and `devices` appliances."""
    with transaction(runtime.ctx.sessions) as session:
        operator = ensure_operator(session, "op", "Test Operator")
        hotel = create_hotel(
            session, operator, f"h{prefix.lower()}", "Test Hotel", rooms=max(devices, 4)
        )
        return place_devices(session, hotel, devices, code_prefix=prefix)


@contextmanager
def running_stack(
    work_dir: Path,
    keys_dir: Path,
    database_url: str,
    mqtt_url: str,
    devices: int = 4,
    *,
    with_workers: bool = True,
    **overrides: object,
) -> Iterator[Stack]:
    """Start a server with the sandbox on a free port; stop it afterwards.

    Without workers the app serves HTTP only: no MQTT link, no background jobs, so a
    test can drive every service step itself.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    sandbox_dir = work_dir / "sandbox"
    shutil.copytree(keys_dir / "sandbox", sandbox_dir)
    wire = TamperingTransport()
    time_scale = float(overrides.pop("sandbox_time_scale", 1000.0))  # type: ignore[arg-type]
    clock = OffsetClock()
    sandbox = Sandbox(sandbox_dir, clock=clock, time_scale=time_scale, notify_transport=wire)
    merchant = sandbox_merchant_settings(keys_dir / "merchant", sandbox, base_url)
    merchant |= {
        "wechat_base_url": f"{base_url}/sandbox/wechatpay",
        "alipay_gateway_url": f"{base_url}/sandbox/alipay/gateway.do",
    }
    settings = Settings.model_validate(
        {
            "data_dir": work_dir,
            "database_url": database_url,
            "mqtt_url": mqtt_url,
            "mqtt_topic_root": f"t{uuid.uuid4().hex[:10]}/v1",
            "public_base_url": base_url,
            "sandbox_enabled": True,
            **merchant,
            **overrides,
        }
    )
    runtime = Runtime(settings, build_providers(settings, clock), clock=clock, sandbox=sandbox)
    wipe(runtime)
    codes = seed_hotel(runtime, devices, prefix=uuid.uuid4().hex[:4].upper())
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime, manage_runtime=with_workers),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        mqtt = runtime.mqtt_endpoint_url() if with_workers else mqtt_url
        yield Stack(runtime, clock, base_url, mqtt, codes, wire)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        if not with_workers:
            runtime.stop()  # the app's lifespan did not own it: close providers and the engine

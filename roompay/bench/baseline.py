"""The bare pipeline: the least any server can do for a payment notify that starts an appliance.

A Starlette app with one handler: verify the WeChat Pay platform RSA signature on the
raw body and decrypt the AES-GCM resource (the same `wire` functions roompay uses),
commit one row with psycopg 3 (one statement that also finds the order's appliance),
publish one QoS 1 MQTT message and wait for the bare device's reply, then answer 204.
No framework above Starlette, no ORM, no logging. Served by uvicorn exactly as
`roompay serve` is, in its own process: `python -m roompay.bench.baseline CONFIG.json`.

On SQLite (`--embedded`) the row is committed with the standard library's sqlite3
in a worker thread, as psycopg has no SQLite.
"""

import asyncio
import gc
import json
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from roompay.bench.mqtt import MiniMqtt
from roompay.payments import crypto
from roompay.payments.wechatpay.wire import (
    WireError,
    decrypt_resource,
    lower_keys,
    verify_platform_signature,
)

POOL_SIZE = 10

TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS bench_baseline ("
    " order_id VARCHAR(64) PRIMARY KEY, provider_trade_no VARCHAR(64), amount_fen INTEGER,"
    " device_code VARCHAR(64), at VARCHAR(40))"
)
INSERT_SQL = (
    "INSERT INTO bench_baseline (order_id, provider_trade_no, amount_fen, device_code, at)"
    " SELECT o.id, {p}, {p}, d.code, {p} FROM orders o JOIN devices d ON d.id = o.device_id"
    " WHERE o.id = {p} RETURNING device_code"
)


@dataclass(frozen=True)
class BaselineConfig:
    """Everything the baseline process needs, passed as a JSON file."""

    port: int
    database: str  # a libpq conninfo/URL, or sqlite:///path
    mqtt_host: str
    mqtt_port: int
    topic_root: str
    platform_public_key_pem: str
    platform_public_key_id: str
    apiv3_key: str

    def write(self, path: Path) -> None:
        """Write the config for the child process."""
        path.write_text(json.dumps(asdict(self)))


class _Store:
    """One committed row per notify: a psycopg pool, or sqlite3 in a thread."""

    def __init__(self, database: str) -> None:
        self._database = database
        self._pool: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self._sqlite: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._database.startswith("sqlite:///"):
            path = self._database.removeprefix("sqlite:///")
            self._sqlite = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._sqlite.execute("PRAGMA busy_timeout=30000")
            self._sqlite.execute("PRAGMA synchronous=NORMAL")
            return
        for _ in range(POOL_SIZE):
            conn = await psycopg.AsyncConnection.connect(self._database, autocommit=True)
            self._pool.put_nowait(conn)

    async def commit(self, order_id: str, trade_no: str, amount_fen: int) -> str | None:
        at = datetime.now(UTC).isoformat()
        if self._sqlite is not None:
            return await asyncio.to_thread(self._sqlite_commit, order_id, trade_no, amount_fen, at)
        conn = await self._pool.get()
        try:
            cursor = await conn.execute(
                INSERT_SQL.format(p="%s"), (trade_no, amount_fen, at, order_id)
            )
            row = await cursor.fetchone()
        finally:
            self._pool.put_nowait(conn)
        return None if row is None else str(row[0])

    def _sqlite_commit(self, order_id: str, trade_no: str, amount_fen: int, at: str) -> str | None:
        assert self._sqlite is not None
        row = self._sqlite.execute(
            INSERT_SQL.format(p="?"), (trade_no, amount_fen, at, order_id)
        ).fetchone()
        return None if row is None else str(row[0])


def create_baseline_app(config: BaselineConfig) -> Starlette:
    """The bare pipeline as an ASGI app."""
    keys = {config.platform_public_key_id: crypto.load_public_key(config.platform_public_key_pem)}
    store = _Store(config.database)
    waiters: dict[str, asyncio.Future[None]] = {}

    def on_reply(_topic: str, payload: bytes) -> None:
        waiter = waiters.pop(json.loads(payload)["cmd_id"], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    mqtt = MiniMqtt(f"roompay-baseline-{uuid.uuid4().hex[:8]}", on_reply)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await store.open()
        await mqtt.connect(config.mqtt_host, config.mqtt_port)
        await mqtt.subscribe([f"{config.topic_root}/dev/+/evt/ack"])
        yield
        await mqtt.disconnect()

    async def notify(request: Request) -> Response:
        body = await request.body()
        try:
            verify_platform_signature(lower_keys(request.headers), body, keys, datetime.now(UTC))
            resource = json.loads(body)["resource"]
            trade = json.loads(
                decrypt_resource(
                    config.apiv3_key,
                    resource["nonce"],
                    resource["associated_data"],
                    resource["ciphertext"],
                )
            )
        except (WireError, ValueError, KeyError):
            return Response(status_code=400)
        code = await store.commit(
            trade["out_trade_no"], trade["transaction_id"], trade["amount"]["total"]
        )
        if code is None:
            return Response(status_code=404)
        cmd_id = uuid.uuid4().hex
        waiter = asyncio.get_running_loop().create_future()
        waiters[cmd_id] = waiter
        command = {"cmd_id": cmd_id, "order_id": trade["out_trade_no"]}
        mqtt.publish(f"{config.topic_root}/dev/{code}/cmd/start", json.dumps(command).encode(), 1)
        try:
            await asyncio.wait_for(waiter, 30)
        except TimeoutError:
            waiters.pop(cmd_id, None)
            return Response(status_code=504)
        return Response(status_code=204)

    async def ready(_request: Request) -> Response:
        return Response(b"ok")

    routes = [
        Route("/notify/wechatpay", notify, methods=["POST"]),
        Route("/readyz", ready, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    """Serve the baseline with the config file named on the command line."""
    config = BaselineConfig(**json.loads(Path(sys.argv[1]).read_text()))
    gc.freeze()  # as `roompay serve` does, so both servers are measured alike
    uvicorn.run(
        create_baseline_app(config),
        host="127.0.0.1",
        port=config.port,
        log_config=None,
        access_log=False,
    )


if __name__ == "__main__":
    main()

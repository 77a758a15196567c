"""Where the real services of the test suite are, and whether they answer."""

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

PG_ADMIN_URL = os.environ.get("ROOMPAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
MOSQUITTO_URL = os.environ.get("ROOMPAY_TEST_MOSQUITTO", "mqtt://127.0.0.1:1883")


def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """Tell whether something accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def postgres_reachable() -> bool:
    """Tell whether the test PostgreSQL answers a query."""
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def mosquitto_reachable() -> bool:
    """Tell whether the test Mosquitto accepts connections."""
    rest = MOSQUITTO_URL.removeprefix("mqtt://").rsplit("@", 1)[-1]
    host, _, port = rest.partition(":")
    return tcp_open(host, int(port or 1883))


@contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test session, dropped afterwards."""
    name = f"roompay_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

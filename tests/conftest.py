"""Fixtures shared by the whole suite.

Functional tests run on two backends: `embedded` (SQLite and the embedded MQTT
broker, needs nothing installed) and `services` (PostgreSQL and Mosquitto). The
services half carries the `services` marker; `./dev test` deselects it, and says
so, only when those services are not reachable, and `.ci/run` never does.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from roompay.demo import sandbox_merchant_settings
from roompay.iot.broker import EmbeddedBroker
from roompay.sandbox.app import Sandbox
from roompay.store.db import upgrade
from tests.support.server import Stack, running_stack
from tests.support.services import MOSQUITTO_URL, scratch_postgres_database


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Provider and merchant keys made once per session (RSA key generation is slow)."""
    root = tmp_path_factory.mktemp("keys")
    sandbox = Sandbox(root / "sandbox")
    sandbox_merchant_settings(root / "merchant", sandbox, "http://placeholder")
    return root


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database that each test copies."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """One embedded broker for the session; tests isolate by topic root."""
    broker = EmbeddedBroker()
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A scratch PostgreSQL database, migrated, for the session."""
    with scratch_postgres_database() as url:
        upgrade(url)
        yield url


BACKENDS = [
    pytest.param("embedded", id="sqlite-embedded"),
    pytest.param("services", id="postgres-mosquitto", marks=pytest.mark.services),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which backend a functional test runs on."""
    return str(request.param)


@pytest.fixture
def backend_urls(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, sqlite_template: Path
) -> tuple[str, str]:
    """(database URL, MQTT URL) for the test's backend."""
    if backend == "embedded":
        db = tmp_path / "roompay.db"
        db.write_bytes(sqlite_template.read_bytes())
        broker: EmbeddedBroker = request.getfixturevalue("embedded_broker")
        return f"sqlite:///{db}", broker.url
    return str(request.getfixturevalue("postgres_url")), MOSQUITTO_URL


@pytest.fixture
def quiet_stack(tmp_path: Path, keys_dir: Path, backend_urls: tuple[str, str]) -> Iterator[Stack]:
    """A server serving HTTP only, its sandbox's notifies held: the test runs every job."""
    database_url, mqtt_url = backend_urls
    with running_stack(tmp_path, keys_dir, database_url, mqtt_url, with_workers=False) as stack:
        stack.notify_wire.held = []
        yield stack


@pytest.fixture
def stack(tmp_path: Path, keys_dir: Path, backend_urls: tuple[str, str]) -> Iterator[Stack]:
    """A running server with the sandbox, on the test's backend."""
    database_url, mqtt_url = backend_urls
    with running_stack(tmp_path, keys_dir, database_url, mqtt_url) as running:
        yield running

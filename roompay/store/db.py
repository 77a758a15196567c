"""Engines, sessions and migrations for SQLite and PostgreSQL."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
POOL_RECYCLE_S = 1800


def make_engine(url: str, pool_size: int = 20) -> Engine:
    """Create an engine tuned for its backend.

    SQLite gets WAL, a busy timeout and `BEGIN IMMEDIATE` for every transaction: a
    deferred transaction that later writes can fail at once with "database is locked"
    when another thread writes first, while an immediate one waits its turn.

    PostgreSQL gets a pool as large as the server's busy threads (the web thread
    pool, the device-message threads, the workers), so connections are reused rather
    than opened and closed under load, and no ping before each checkout: that was one
    more round trip in every transaction. A connection that died meanwhile fails its
    transaction once, SQLAlchemy then replaces the whole pool, and what failed is
    retried by its sender (providers re-send notifies, devices and the dispatcher
    re-send messages); connections are also renewed every `POOL_RECYCLE_S`.
    """
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_engine(
        url, pool_size=pool_size, max_overflow=pool_size // 2, pool_recycle=POOL_RECYCLE_S
    )


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Make the session factory; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """Run the block in one transaction: commit on success, roll back on any error."""
    with sessions() as session, session.begin():
        yield session


def alembic_config(url: str) -> Config:
    """Alembic configuration pointing at the packaged migrations and this database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str) -> None:
    """Apply every migration to the database at `url`."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), "head")


def ping(engine: Engine) -> None:
    """Raise if the database cannot answer a trivial query."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))

"""The migrations build exactly the schema the models describe, on both databases."""

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from roompay.store.db import upgrade
from roompay.store.models import Base
from tests.support.services import scratch_postgres_database


def _differences(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_sqlite_migrations_match_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    assert _differences(url) == []


@pytest.mark.services
def test_postgresql_migrations_match_the_models() -> None:
    with scratch_postgres_database() as url:
        upgrade(url)
        assert _differences(url) == []

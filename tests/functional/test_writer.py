"""The batch writer on a real database: order, batches, failures alone, after-commit only."""

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select
from sqlalchemy.orm import Session, sessionmaker

from roompay.store.db import make_engine, session_factory
from roompay.store.writer import AfterCommit, BatchWriter, Job
from tests.support.services import postgres_reachable, scratch_postgres_database

metadata = MetaData()
notes = Table(
    "writer_notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("text", String(40), unique=True),
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'writer.db'}"
        yield from _sessions(url)
        return
    assert postgres_reachable()
    with scratch_postgres_database() as url:
        yield from _sessions(url)


def _sessions(url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(url)
    metadata.create_all(engine)
    try:
        yield session_factory(engine)
    finally:
        engine.dispose()


def _note(text: str, log: list[str]) -> Job[str]:
    def job(session: Session, after: AfterCommit) -> str:
        session.connection().execute(notes.insert().values(text=text))
        after.add(lambda: log.append(f"after {text}"))
        return text.upper()

    return job


def _texts(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(notes.c.text).order_by(notes.c.id)))


def _held(writer: BatchWriter) -> threading.Event:
    """Occupy the writer with a job that waits for the returned event."""
    release = threading.Event()
    started = threading.Event()

    def hold(_session: Session, _after: AfterCommit) -> None:
        started.set()
        release.wait(10)

    writer.submit(hold)
    assert started.wait(10)
    return release


def test_jobs_waiting_together_commit_together_in_their_order(
    sessions: sessionmaker[Session],
) -> None:
    writer = BatchWriter(sessions)
    writer.start()
    log: list[str] = []
    try:
        # Given the writer is busy while five jobs arrive
        release = _held(writer)
        futures = [writer.submit(_note(f"n{i}", log)) for i in range(5)]
        assert writer.waiting == 5
        # When it is free again
        release.set()
        results = [future.result(10) for future in futures]
    finally:
        writer.stop()
    # Then the five ran as one batch, in order, each caller with its own result
    assert results == ["N0", "N1", "N2", "N3", "N4"]
    assert _texts(sessions) == ["n0", "n1", "n2", "n3", "n4"]
    assert (writer.batches, writer.jobs) == (2, 6)
    assert log == [f"after n{i}" for i in range(5)]


def test_a_failing_job_fails_alone_and_its_batch_mates_are_applied(
    sessions: sessionmaker[Session],
) -> None:
    writer = BatchWriter(sessions)
    writer.start()
    log: list[str] = []
    try:
        release = _held(writer)
        # Given a batch whose third job breaks a unique constraint
        futures = [writer.submit(_note(text, log)) for text in ("a", "b", "a", "c")]
        release.set()
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(10))
            except Exception as exc:  # the job's own database error
                outcomes.append(type(exc).__name__)
    finally:
        writer.stop()
    # Then only that job failed, with its own error, and nothing of it was written
    assert outcomes == ["A", "B", "IntegrityError", "C"]
    assert _texts(sessions) == ["a", "b", "c"]
    # And its after-commit action never ran: its transaction never committed
    assert log == ["after a", "after b", "after c"]


def test_after_commit_actions_see_the_committed_rows(sessions: sessionmaker[Session]) -> None:
    seen: list[list[str]] = []

    def job(session: Session, after: AfterCommit) -> None:
        session.connection().execute(notes.insert().values(text="visible"))
        after.add(lambda: seen.append(_texts(sessions)))

    writer = BatchWriter(sessions)
    writer.start()
    try:
        writer.run(job)
    finally:
        writer.stop()
    # Another connection read the row from inside the action: it was committed
    assert seen == [["visible"]]


def test_a_job_that_submits_a_job_is_refused_instead_of_waiting_for_itself(
    sessions: sessionmaker[Session],
) -> None:
    writer = BatchWriter(sessions)
    writer.start()
    log: list[str] = []

    def nested(session: Session, after: AfterCommit) -> str:
        return writer.run(_note("inner", log))

    try:
        with pytest.raises(RuntimeError, match="must not submit jobs"):
            writer.run(nested)
    finally:
        writer.stop()
    assert _texts(sessions) == []


def test_a_writer_not_running_runs_the_job_on_the_callers_thread(
    sessions: sessionmaker[Session],
) -> None:
    writer = BatchWriter(sessions)
    log: list[str] = []
    # Never started (or already stopped): the job still runs, at once
    assert writer.run(_note("inline", log)) == "INLINE"
    writer.start()
    writer.stop()
    assert writer.run(_note("after-stop", log)) == "AFTER-STOP"
    assert _texts(sessions) == ["inline", "after-stop"]
    assert log == ["after inline", "after after-stop"]

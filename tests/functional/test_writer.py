"""The batch writer on a real database: order, batches, failures alone, after-commit only;
the striped writer: one appliance's jobs in order on one writer, others beside them; and a
server's writers on PostgreSQL, each on a connection of its own."""

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, select, text
from sqlalchemy.orm import Session, sessionmaker

from roompay.store import hot_path
from roompay.store.db import make_engine, session_factory
from roompay.store.models import Device
from roompay.store.writer import AfterCommit, BatchWriter, Job, StripedWriter
from tests.support.server import Stack
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


@pytest.fixture
def postgres_sessions() -> Iterator[sessionmaker[Session]]:
    """PostgreSQL only: SQLite admits one writing transaction at a time (one stripe)."""
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


def _run_after_waiting(writer: BatchWriter, submit: Callable[[], "list[Future[str]]"]) -> list[str]:
    """Start the writer, keep it busy while `submit` queues jobs, free it; their results."""
    writer.start()
    try:
        release = _held(writer)
        futures = submit()
        assert writer.waiting == len(futures)
        release.set()
        return [future.result(10) for future in futures]
    finally:
        writer.stop()


def test_jobs_waiting_together_commit_together_in_their_order(
    sessions: sessionmaker[Session],
) -> None:
    writer = BatchWriter(sessions)
    log: list[str] = []
    # Given the writer is busy while five jobs arrive; when it is free again
    results = _run_after_waiting(
        writer, lambda: [writer.submit(_note(f"n{i}", log)) for i in range(5)]
    )
    # Then the five ran as one batch, in order, each caller with its own result
    assert results == ["N0", "N1", "N2", "N3", "N4"]
    assert _texts(sessions) == ["n0", "n1", "n2", "n3", "n4"]
    assert (writer.batches, writer.jobs) == (2, 6)
    assert log == [f"after n{i}" for i in range(5)]


def test_urgent_jobs_go_before_those_waiting_and_keep_their_own_order(
    sessions: sessionmaker[Session],
) -> None:
    writer = BatchWriter(sessions)
    log: list[str] = []
    # Given the writer is busy while run events and then two answers arrive; when it is free
    results = _run_after_waiting(
        writer,
        lambda: (
            [writer.submit(_note(f"run{i}", log)) for i in range(3)]
            + [writer.submit(_note(f"ack{i}", log), urgent=True) for i in range(2)]
        ),
    )
    # Then the answers were applied first, in their order, in the same batch as the rest
    assert results == ["RUN0", "RUN1", "RUN2", "ACK0", "ACK1"]
    assert _texts(sessions) == ["ack0", "ack1", "run0", "run1", "run2"]
    assert (writer.batches, writer.jobs) == (2, 6)
    assert log == ["after ack0", "after ack1", "after run0", "after run1", "after run2"]


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


def _keys_on_two_stripes(writer: StripedWriter) -> tuple[str, str]:
    first = "DRY-0001"
    other = next(
        f"AIR-{n:04d}"
        for n in range(1, 1000)
        if writer.stripe(f"AIR-{n:04d}") is not writer.stripe(first)
    )
    return first, other


@pytest.mark.services
def test_a_busy_appliance_does_not_hold_back_another_ones_jobs(
    postgres_sessions: sessionmaker[Session],
) -> None:
    writer = StripedWriter([postgres_sessions] * 4)
    writer.start()
    log: list[str] = []
    busy, free = _keys_on_two_stripes(writer)
    release = threading.Event()
    started = threading.Event()

    def hold(_session: Session, _after: AfterCommit) -> None:
        started.set()
        release.wait(10)

    try:
        # Given one appliance's writer is busy in a transaction
        held = writer.submit(hold, busy)
        assert started.wait(10)
        queued = writer.submit(_note("same appliance", log), busy)
        # When another appliance's job comes
        other = writer.submit(_note("other appliance", log), free)
        # Then it commits while the first is still busy; the busy one's next job waits
        assert other.result(10) == "OTHER APPLIANCE"
        assert not queued.done()
        assert _texts(postgres_sessions) == ["other appliance"]
        release.set()
        assert queued.result(10) == "SAME APPLIANCE"
        held.result(10)
    finally:
        release.set()
        writer.stop()
    assert _texts(postgres_sessions) == ["other appliance", "same appliance"]


def test_one_appliances_jobs_go_to_one_writer_in_the_order_submitted(
    sessions: sessionmaker[Session],
) -> None:
    writer = StripedWriter([sessions] * 4)
    writer.start()
    log: list[str] = []
    try:
        futures = [writer.submit(_note(f"m{i}", log), "DRY-0007") for i in range(6)]
        results = [future.result(10) for future in futures]
    finally:
        writer.stop()
    assert results == [f"M{i}" for i in range(6)]
    assert _texts(sessions) == [f"m{i}" for i in range(6)]
    assert writer.jobs == 6
    assert writer.stripe("DRY-0007") is writer.stripe("DRY-0007")


def test_a_job_that_waits_for_another_writer_is_refused(sessions: sessionmaker[Session]) -> None:
    writer = StripedWriter([sessions] * 4)
    writer.start()
    log: list[str] = []
    first, other = _keys_on_two_stripes(writer)

    def nested(session: Session, after: AfterCommit) -> str:
        return writer.run(_note("inner", log), other)

    try:
        # Two writers each waiting for the other would never finish
        with pytest.raises(RuntimeError, match="must not submit jobs"):
            writer.run(nested, first)
    finally:
        writer.stop()
    assert _texts(sessions) == []


@pytest.mark.services
@pytest.mark.parametrize("backend", ["services"], indirect=True)
def test_a_servers_writer_keeps_its_connection_and_prepared_statements(stack: Stack) -> None:
    """On PostgreSQL each writer owns its connection: readers' rollbacks on the shared
    pool do not throw away what psycopg prepared on it, nor does a job land elsewhere."""
    ctx = stack.runtime.ctx
    code = stack.device_codes[0]

    def heartbeat(session: Session, _after: AfterCommit) -> int:
        conn = session.connection()
        conn.execute(hot_path.HEARTBEAT, {"p_code": code, "p_now": ctx.clock.now()})
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def prepared(session: Session, _after: AfterCommit) -> int:
        query = text(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'UPDATE devices%'"
        )
        return int(session.connection().execute(query).scalar_one())

    pids = set()
    for _ in range(8):
        pids.add(ctx.execute(heartbeat, code))
        with ctx.sessions() as session:  # a reader: ends with a ROLLBACK on the shared pool
            session.execute(select(Device.id).where(Device.code == code)).all()
    assert len(pids) == 1
    assert ctx.execute(prepared, code) >= 1

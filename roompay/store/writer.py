"""One writer thread for the hot path: jobs run in order, many to a transaction.

A job is a function of a Session: it writes what it decided inside the session's
transaction and lists in `AfterCommit` what must happen only once that transaction
is durable (publish a start command, acknowledge a run event, wake a worker). The
writer takes every job waiting (up to `max_batch`), runs them one after the other in
one transaction, commits once, then runs their after-commit actions and hands each
caller its result. On a quiet server a batch holds one job: nothing waits for company.

If any job of a batch raises, the batch is rolled back and each of its jobs runs
again alone, in its own transaction; so a job fails alone, with its own exception,
and the others are applied (each job is idempotent under its row locks, as the
services write them).

Why one thread: every round trip to the database hands the GIL away and must win it
back from whichever thread holds it, and every commit waits for the disk. Payment
notifies and device messages handled on a dozen threads, each in its own transaction,
spent most of their time doing exactly that (docs/performance.md). One writer also
suits SQLite, which admits one writer at a time anyway. On PostgreSQL a few writers
(`StripedWriter`, one per stripe of appliances) keep a few transactions in flight.
"""

import logging
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 256

_writer_thread = threading.local()
"""Marks the writers' own threads: a job there must not wait for a writer."""


class AfterCommit:
    """What a job wants done once its transaction has committed, in the order added."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], object]] = []

    def add(self, action: Callable[[], object]) -> None:
        """Run `action` after the commit (never if the transaction rolls back)."""
        self._actions.append(action)

    def run(self) -> None:
        """Run the actions; one that fails is logged and does not stop the rest."""
        for action in self._actions:
            try:
                action()
            except Exception:
                # The transaction is already committed: nothing to undo, only to report.
                log.exception("an after-commit action failed")


Job = Callable[[Session, AfterCommit], T]
"""Writes in the given session's transaction; returns the caller's result.

The result is a plain value, not an ORM object: the next job of the batch expires them.
A job never commits, never opens a transaction of its own and never submits a job."""


@dataclass
class _Pending(Generic[T]):
    job: Job[T]
    future: "Future[T]" = field(default_factory=Future)


def run_alone(sessions: sessionmaker[Session], job: Job[T]) -> T:
    """Run one job in its own transaction, then its after-commit actions."""
    after = AfterCommit()
    with _transaction(sessions) as session:
        result = job(session, after)
    after.run()
    return result


@contextmanager
def _transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session, session.begin():
        yield session


def _isolate(session: Session) -> None:
    """Let the next job of a batch start as if alone: the last one's ORM changes are in the
    database (a Core statement does not flush them), and nothing it loaded is trusted."""
    session.flush()
    session.expire_all()


class BatchWriter:
    """The writer thread and its queue of jobs."""

    def __init__(
        self, sessions: sessionmaker[Session], *, max_batch: int = MAX_BATCH, name: str = "writer"
    ) -> None:
        if max_batch < 1:
            raise ValueError("a batch holds at least one job")
        self._sessions = sessions
        self._max_batch = max_batch
        self._name = name
        self._queue: deque[_Pending[Any]] = deque()
        self._urgent: deque[_Pending[Any]] = deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.jobs = 0

    @property
    def waiting(self) -> int:
        """How many jobs wait for the writer now."""
        with self._ready:
            return len(self._queue) + len(self._urgent)

    def start(self) -> None:
        """Start the writer thread."""
        with self._ready:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Run what is already queued, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def submit(self, job: Job[T], *, urgent: bool = False) -> "Future[T]":
        """Queue a job; the future gets its result once its transaction committed.

        An `urgent` job goes before every job that is not (a device's answer to a
        command: the command's deadline runs while it waits behind run events).

        A writer that is not running runs the job at once on the caller's thread, so
        nothing submitted while the process starts or stops is lost.
        """
        if getattr(_writer_thread, "active", False):
            raise RuntimeError("a job must not submit jobs: the writer would wait for itself")
        pending: _Pending[T] = _Pending(job)
        with self._ready:
            running = self._thread is not None and self._thread.is_alive() and not self._stopping
            if running:
                (self._urgent if urgent else self._queue).append(pending)
                self._ready.notify()
        if not running:
            self._execute([pending])
        return pending.future

    def run(self, job: Job[T]) -> T:
        """Submit a job and wait for its result (or its exception)."""
        return self.submit(job).result()

    def _run(self) -> None:
        _writer_thread.active = True
        while True:
            with self._ready:
                while not self._queue and not self._urgent and not self._stopping:
                    self._ready.wait()
                if not self._queue and not self._urgent:
                    return
                batch = self._take(self._urgent, self._max_batch)
                batch += self._take(self._queue, self._max_batch - len(batch))
            self._execute(batch)

    @staticmethod
    def _take(queue: "deque[_Pending[Any]]", most: int) -> list[_Pending[Any]]:
        return [queue.popleft() for _ in range(min(most, len(queue)))]

    def _execute(self, batch: list[_Pending[Any]]) -> None:
        afters = [AfterCommit() for _ in batch]
        try:
            with _transaction(self._sessions) as session:
                results = []
                for index, (item, after) in enumerate(zip(batch, afters, strict=True)):
                    if index:
                        _isolate(session)
                    results.append(item.job(session, after))
        except Exception as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            log.info("a batch of %d jobs failed (%s); running each alone", len(batch), exc)
            for item in batch:
                self._execute([item])
            return
        self.batches += 1
        self.jobs += len(batch)
        for item, after, result in zip(batch, afters, results, strict=True):
            after.run()
            item.future.set_result(result)


class StripedWriter:
    """Several writers, each job going to the one its key names.

    The key is the appliance a job is about (its code): every job that locks an
    appliance's rows, and its orders' and commands' rows, goes to the same writer, in
    the order submitted, so two writers' batches never wait on each other's row locks
    (no deadlock) and an appliance's messages are applied in the order they came. On
    PostgreSQL several writers keep several transactions in flight at once; SQLite has
    one writer at a time anyway, so it gets one stripe.

    Each stripe gets its own session factory: on PostgreSQL the runtime binds each to
    a one-connection pool, so a writer keeps its connection and the statements
    psycopg prepared on it (a pooled connection shared with readers loses them at the
    readers' every ROLLBACK, and is parsed and planned again each time).
    """

    def __init__(self, sessions: list[sessionmaker[Session]]) -> None:
        """One writer per session factory given."""
        if not sessions:
            raise ValueError("a striped writer has at least one stripe")
        self._stripes = [
            BatchWriter(factory, name=f"writer-{i}") for i, factory in enumerate(sessions)
        ]

    @property
    def stripes(self) -> int:
        """How many writers there are."""
        return len(self._stripes)

    @property
    def waiting(self) -> int:
        """How many jobs wait for a writer now."""
        return sum(stripe.waiting for stripe in self._stripes)

    @property
    def batches(self) -> int:
        """How many transactions the writers have committed."""
        return sum(stripe.batches for stripe in self._stripes)

    @property
    def jobs(self) -> int:
        """How many jobs the writers have applied."""
        return sum(stripe.jobs for stripe in self._stripes)

    def start(self) -> None:
        """Start every writer thread."""
        for stripe in self._stripes:
            stripe.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Run what is queued, then stop every writer thread."""
        for stripe in self._stripes:
            stripe.stop(timeout_s)

    def stripe(self, key: str) -> BatchWriter:
        """The writer for jobs about `key`."""
        return self._stripes[zlib.crc32(key.encode()) % len(self._stripes)]

    def submit(self, job: Job[T], key: str, *, urgent: bool = False) -> "Future[T]":
        """Queue a job on its key's writer (see `BatchWriter.submit`)."""
        return self.stripe(key).submit(job, urgent=urgent)

    def run(self, job: Job[T], key: str) -> T:
        """Submit a job on its key's writer and wait for its result."""
        return self.submit(job, key).result()

"""The device's durable memory: what it answered, what it is running, what the server still lacks.

One SQLite file in WAL mode with `synchronous=FULL`, so a committed write has
reached the disk before the agent acknowledges anything. Each method is one
transaction; the ones that matter for exactly-once starts write everything they
change at once:

- `accept_start`: the answer, the new last `seq`, the active run and its
  `started` event, before the broker gets its PUBACK and before the relay closes;
- `end_run`: the end of the run, its `ended` event and (for a stop command) the
  answer and `seq`;
- `record_events`: progress events and the run's elapsed-time checkpoint.

Run events stay in the outbox until the server acknowledges them with `run_ack`.
"""

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from roompay.protocol.messages import CommandAck, RunEvent, decode, encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS answers (
    cmd_id TEXT PRIMARY KEY,
    answer TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS active_run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    run_id TEXT NOT NULL,
    cmd_id TEXT NOT NULL,
    order_id TEXT NOT NULL,
    duration_s INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    elapsed_s INTEGER NOT NULL,
    lease_s INTEGER NOT NULL,
    checkpoint_at TEXT NOT NULL,
    next_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""

_BOOTS = "boots"
_LAST_SEQ = "last_seq"
_FAULTED = "faulted"


class JournalError(RuntimeError):
    """The journal is closed, or its file cannot be used."""


@dataclass(frozen=True, slots=True)
class JournaledRun:
    """The run in progress, as the journal last saw it.

    `elapsed_s` is run time the device has confirmed (the last checkpoint). `lease_s`
    is how far the relay may have got before the next checkpoint: a run resumed
    after a reboot goes on from `lease_s`, so the appliance never runs longer in
    total than was paid, while a run ended by the reboot bills only `elapsed_s`.
    """

    run_id: str
    cmd_id: str
    order_id: str
    duration_s: int
    started_at: datetime
    elapsed_s: int
    lease_s: int
    checkpoint_at: datetime
    next_seq: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Run time confirmed so far, how far the relay may go before the next one, and when."""

    elapsed_s: int
    lease_s: int
    at: datetime


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer to journal with its command: `seq` only when the command was accepted."""

    ack: CommandAck
    expires_at: datetime
    accepted_seq: int | None = None


class SqliteJournal:
    """The journal in one SQLite file; `path=None` keeps it in memory (for tests).

    Thread-safe: one connection behind a lock. `open` and `close` may be called
    again; an in-memory journal forgets everything when closed.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> Path | None:
        """Return the file, or None for an in-memory journal."""
        return self._path

    def open(self) -> None:
        """Open the file (creating it) and its tables; does nothing if already open."""
        with self._lock:
            if self._conn is not None:
                return
            target = ":memory:" if self._path is None else str(self._path)
            try:
                conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise JournalError(f"cannot open the device journal {target}: {exc}") from exc
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (WAL fsynced) before it returns.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            self._conn = conn

    def close(self) -> None:
        """Close the file; safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- boots, sequence numbers, faults ----------------------------------

    def boot(self) -> int:
        """Count one more boot and return its number (1 for the first)."""
        with self._transaction() as conn:
            boots = _meta(conn, _BOOTS, 0) + 1
            _set_meta(conn, _BOOTS, boots)
            return boots

    def last_seq(self) -> int:
        """Return the `seq` of the last accepted command, or -1 if none was accepted."""
        with self._transaction() as conn:
            return _meta(conn, _LAST_SEQ, -1)

    def faulted(self) -> bool:
        """Tell whether the device is marked faulted."""
        with self._transaction() as conn:
            return _meta(conn, _FAULTED, 0) == 1

    def set_faulted(self, faulted: bool) -> None:
        """Mark the device faulted, or clear the mark."""
        with self._transaction() as conn:
            _set_meta(conn, _FAULTED, int(faulted))

    # --- answers ----------------------------------------------------------

    def answer_for(self, cmd_id: str) -> CommandAck | None:
        """Return the answer given to `cmd_id`, or None if it was never answered."""
        with self._transaction() as conn:
            row = conn.execute("SELECT answer FROM answers WHERE cmd_id = ?", (cmd_id,)).fetchone()
        return None if row is None else decode(CommandAck, row[0].encode())

    def record_answer(self, answer: Answer) -> None:
        """Journal a rejection (or any answer that changes nothing else)."""
        with self._transaction() as conn:
            _insert_answer(conn, answer)

    def prune_answers(self, expired_before: datetime) -> int:
        """Forget answers to commands that expired before `expired_before`; return how many."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM answers WHERE expires_at < ?", (_timestamp(expired_before),)
            )
            return cursor.rowcount

    # --- runs -------------------------------------------------------------

    def accept_start(self, answer: Answer, run: JournaledRun, started: RunEvent) -> None:
        """Journal an accepted start: answer, `seq`, the active run and its `started` event."""
        with self._transaction() as conn:
            if conn.execute("SELECT 1 FROM active_run").fetchone() is not None:
                raise JournalError("a run is already active")
            _insert_answer(conn, answer)
            conn.execute(
                "INSERT INTO active_run (id, run_id, cmd_id, order_id, duration_s, started_at,"
                " elapsed_s, lease_s, checkpoint_at, next_seq)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.run_id,
                    run.cmd_id,
                    run.order_id,
                    run.duration_s,
                    _timestamp(run.started_at),
                    run.elapsed_s,
                    run.lease_s,
                    _timestamp(run.checkpoint_at),
                    run.next_seq,
                ),
            )
            _insert_event(conn, started)

    def active_run(self) -> JournaledRun | None:
        """Return the run in progress, or None."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT run_id, cmd_id, order_id, duration_s, started_at, elapsed_s, lease_s,"
                " checkpoint_at, next_seq FROM active_run"
            ).fetchone()
        if row is None:
            return None
        return JournaledRun(
            run_id=row[0],
            cmd_id=row[1],
            order_id=row[2],
            duration_s=row[3],
            started_at=_parse_timestamp(row[4]),
            elapsed_s=row[5],
            lease_s=row[6],
            checkpoint_at=_parse_timestamp(row[7]),
            next_seq=row[8],
        )

    def record_events(
        self, run_id: str, events: Sequence[RunEvent], checkpoint: Checkpoint | None
    ) -> None:
        """Journal events of the active run and, if given, its new checkpoint."""
        with self._transaction() as conn:
            for event in events:
                _insert_event(conn, event)
                conn.execute(
                    "UPDATE active_run SET next_seq = ? WHERE run_id = ?", (event.seq + 1, run_id)
                )
            if checkpoint is not None:
                conn.execute(
                    "UPDATE active_run SET elapsed_s = ?, lease_s = ?, checkpoint_at = ?"
                    " WHERE run_id = ?",
                    (
                        checkpoint.elapsed_s,
                        checkpoint.lease_s,
                        _timestamp(checkpoint.at),
                        run_id,
                    ),
                )

    def end_run(self, ended: RunEvent, answer: Answer | None = None) -> None:
        """Journal the end of the active run, its `ended` event and the stop's answer."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM active_run WHERE run_id = ?", (ended.run_id,))
            _insert_event(conn, ended)
            if answer is not None:
                _insert_answer(conn, answer)

    # --- the outbox -------------------------------------------------------

    def outbox(self) -> list[RunEvent]:
        """Return every run event the server has not acknowledged, oldest first."""
        with self._transaction() as conn:
            rows = conn.execute("SELECT event FROM outbox ORDER BY rowid").fetchall()
        return [decode(RunEvent, row[0].encode()) for row in rows]

    def unsent_count(self) -> int:
        """Return how many run events wait for the server's acknowledgement."""
        with self._transaction() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def acknowledge(self, run_id: str, seq: int) -> int:
        """Drop the events of `run_id` up to `seq`; return how many were dropped."""
        with self._transaction() as conn:
            cursor = conn.execute("DELETE FROM outbox WHERE run_id = ? AND seq <= ?", (run_id, seq))
            return cursor.rowcount

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise JournalError("the device journal is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def _meta(conn: sqlite3.Connection, key: str, default: int) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else int(row[0])


def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _insert_answer(conn: sqlite3.Connection, answer: Answer) -> None:
    conn.execute(
        "INSERT INTO answers (cmd_id, answer, expires_at) VALUES (?, ?, ?)",
        (answer.ack.cmd_id, encode(answer.ack).decode(), _timestamp(answer.expires_at)),
    )
    if answer.accepted_seq is not None:
        _set_meta(conn, _LAST_SEQ, answer.accepted_seq)


def _insert_event(conn: sqlite3.Connection, event: RunEvent) -> None:
    conn.execute(
        "INSERT INTO outbox (run_id, seq, event) VALUES (?, ?, ?)",
        (event.run_id, event.seq, encode(event).decode()),
    )


def _timestamp(moment: datetime) -> str:
    # One fixed UTC format, so that stored times also compare correctly as text.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


__all__ = [
    "Answer",
    "Checkpoint",
    "JournalError",
    "JournaledRun",
    "SqliteJournal",
]

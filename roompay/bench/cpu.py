"""CPU time per order, process by process: where a phase spent the machine's cores.

The server's own CPU per order says how far one interpreter is from the baseline; this
says what the rest of the machine paid for the same orders (the database, the broker,
the appliances, the load generator), and so how many orders a second the machine could
carry if the server cost nothing: its cores divided by what the others spend per order.
That bounds the throughput any server doing the same database work could reach here.
"""

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

COMPONENTS = ("server", "database", "broker", "appliances", "load")
"""The groups of processes measured, in the order the report shows them."""


def cpu_ticks(pid: int) -> int:
    """User plus system CPU time of a process so far, in clock ticks (0 once it is gone)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    return 0


class DatabaseProcesses:
    """The PostgreSQL processes doing this run's work, found anew at each call.

    The backends connected to the run's own database and the cluster's background
    processes (WAL writer, checkpointer, background writer) that write for it; not the
    backends of other databases on the same cluster. Empty if the cluster runs where
    this machine cannot see its processes.
    """

    def __init__(self, libpq_url: str) -> None:
        self._conn = psycopg.connect(libpq_url, autocommit=True)

    def __call__(self) -> list[int]:
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() OR backend_type <> 'client backend'"
        ).fetchall()
        return [int(pid) for (pid,) in rows if _is_postgres(int(pid))]

    def close(self) -> None:
        """Close the connection the pids are read with."""
        self._conn.close()


def _is_postgres(pid: int) -> bool:
    """Whether `pid` is a PostgreSQL process of this machine (not one of a remote cluster's
    pids that happens to name a process here)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().startswith("postgres")
    return False


@dataclass(frozen=True)
class ProcessGroups:
    """Which processes make up each component (`COMPONENTS`)."""

    server: int
    database: Callable[[], list[int]]
    broker: int | None
    appliances: Callable[[], list[int]]
    load: int

    def pids(self) -> dict[str, list[int]]:
        """The pids of each component now."""
        return {
            "server": [self.server],
            "database": self.database(),
            "broker": [] if self.broker is None else [self.broker],
            "appliances": self.appliances(),
            "load": [self.load],
        }


class CpuMeter:
    """CPU ticks of each component from `start()`; `per_order` turns them into ms per order."""

    def __init__(self, groups: ProcessGroups) -> None:
        self._groups = groups
        self._before: dict[str, dict[int, int]] = {}

    def start(self) -> "CpuMeter":
        """Take the starting counts."""
        self._before = self._ticks()
        return self

    def per_order(self, orders: int) -> dict[str, float]:
        """Each component's CPU since `start()` per order, in ms; and their `total`.

        A process started since counts all its time; one that ended since is lost
        (the servers, broker and appliances run throughout; database backends too).
        """
        after = self._ticks()
        tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
        spent = {
            name: sum(ticks - self._before[name].get(pid, 0) for pid, ticks in now.items())
            for name, now in after.items()
        }
        figures = {
            name: round(spent[name] * tick_ms / orders, 2) if orders else 0.0 for name in COMPONENTS
        }
        figures["total"] = round(sum(figures[name] for name in COMPONENTS), 2)
        return figures

    def _ticks(self) -> dict[str, dict[int, int]]:
        return {
            name: {pid: cpu_ticks(pid) for pid in pids}
            for name, pids in self._groups.pids().items()
        }


def without_server_per_second(figures: dict[str, float], cores: int) -> float:
    """Orders a second the machine's cores carry if the server cost nothing (0 if unknown).

    The other components' CPU per order is what the same work costs them whatever
    the server is; the cores divided by it bound any server's closed-loop throughput.
    """
    rest = figures["total"] - figures["server"]
    return round(cores * 1000 / rest) if rest > 0 else 0.0

"""Background threads that run the services' periodic jobs.

Each worker calls one job in a loop: at once when woken (after a commit that
queued work for it), else every `interval_s`. Workers coordinate through the
database, never through memory, so several server processes can run them side by side.
"""

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class PeriodicWorker:
    """Runs `job` in its own thread until stopped."""

    def __init__(self, name: str, job: Callable[[], object], interval_s: float) -> None:
        self._job = job
        self._interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def wake(self) -> None:
        """Run the job now instead of at the next interval."""
        self._wake.set()

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and wait for the job in progress to finish."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._job()
            except Exception:
                log.exception("%s failed; retrying at the next interval", self._thread.name)

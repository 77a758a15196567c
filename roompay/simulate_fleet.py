"""The simulated appliances of `roompay simulate`, spread over worker processes.

paho waits on its sockets with select(), which fails for file descriptors past
1023, so one process cannot carry a large fleet. Each worker process runs at most
`DEVICES_PER_WORKER` appliances (`DeviceAgent`s on their SQLite journals); the
simulator drives them over a pipe (boot, clean stop, arm a power cut), and at the
end every worker hands back the runs its appliances' journals started, so that the
history is still checked as a whole.
"""

import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roompay.device.agent import DeviceAgent
from roompay.device.journal import Answer, JournaledRun, SqliteJournal
from roompay.device.relay import SimulatedRelay
from roompay.domain.catalog import ApplianceKind
from roompay.iot.broker import EmbeddedBroker
from roompay.protocol.messages import RunEvent
from roompay.protocol.mqtt_url import MqttEndpoint
from roompay.protocol.signing import device_key
from roompay.protocol.topics import Topics
from roompay.services.seed import KIND_PREFIX

log = logging.getLogger(__name__)

# An appliance holds four descriptors in the process that runs it (its socket and
# its journal's database, WAL and shared-memory files): 80 stay well below 1024.
DEVICES_PER_WORKER = 80
BOOT_WAVE = 10
CALL_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class RunStart:
    """An appliance accepted a start and switched on: one run, as its journal recorded it."""

    device: str
    order_id: str
    run_id: str
    cmd_id: str


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """What a worker needs to run its share of the fleet (sent to a new process)."""

    codes: tuple[str, ...]
    endpoint: MqttEndpoint
    topic_root: str
    journal_dir: Path
    time_scale: float
    secret_key: str
    log_level: int | None = None


@dataclass(frozen=True, slots=True)
class FleetOutcome:
    """What the appliances did: every run their journals started, and the power cuts."""

    starts: tuple[RunStart, ...]
    power_cuts: int


def kind_of(code: str) -> ApplianceKind:
    """The appliance kind a seeded device code names."""
    for kind, prefix in KIND_PREFIX.items():
        if f"{prefix}-" in code:
            return kind
    raise ValueError(f"no appliance kind in device code {code}")


# --- inside a worker -------------------------------------------------------------------


class _RecordingJournal(SqliteJournal):
    """The device's journal, also telling the simulation of every run it starts."""

    def __init__(self, path: Path, code: str, starts: list[RunStart], lock: threading.Lock):
        super().__init__(path)
        self._code = code
        self._starts = starts
        self._starts_lock = lock

    def accept_start(self, answer: Answer, run: JournaledRun, started: RunEvent) -> None:
        super().accept_start(answer, run, started)
        with self._starts_lock:
            self._starts.append(RunStart(self._code, run.order_id, run.run_id, run.cmd_id))


class _ArmedRelay(SimulatedRelay):
    """A relay that can cut the power right after it next switches on."""

    def __init__(self) -> None:
        super().__init__()
        self.on_switch_on: Callable[[], None] | None = None

    def on(self) -> None:
        super().on()
        callback, self.on_switch_on = self.on_switch_on, None
        if callback is not None:
            # The agent holds its lock while switching: the power cut comes from outside.
            threading.Thread(target=callback, name="power-cut", daemon=True).start()


@dataclass
class _Appliance:
    code: str
    relay: _ArmedRelay
    journal_path: Path
    agent: DeviceAgent | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class LocalFleet:
    """Appliances in this process, their journals and the runs they started."""

    def __init__(self, spec: FleetSpec) -> None:
        self._spec = spec
        self._topics = Topics(spec.topic_root)
        self.stopping = threading.Event()
        self.starts: list[RunStart] = []
        self._starts_lock = threading.Lock()
        self._cuts_lock = threading.Lock()
        self.power_cuts = 0
        spec.journal_dir.mkdir(parents=True, exist_ok=True)
        self.appliances = {
            code: _Appliance(code, _ArmedRelay(), spec.journal_dir / f"{code}.journal")
            for code in spec.codes
        }

    def boot(self, code: str) -> None:
        """Start a new agent on the device's journal, retrying while the broker is away."""
        appliance = self.appliances[code]
        while not self.stopping.is_set():
            agent = DeviceAgent(
                code,
                self._spec.endpoint,
                self._topics,
                appliance.relay,
                device_key=device_key(self._spec.secret_key.encode(), code, "k1"),
                key_id="k1",
                journal=_RecordingJournal(
                    appliance.journal_path, code, self.starts, self._starts_lock
                ),
                time_scale=self._spec.time_scale,
                progress_every_s=3600.0,
                checkpoint_every_s=1800.0,
                resume_window_s=600.0,
                resend_every_s=2.0,
                heartbeat_s=30.0,
            )
            try:
                agent.start(timeout_s=30)
            except Exception:  # the broker may be restarting; try again
                time.sleep(0.2)
                continue
            with appliance.lock:
                appliance.agent = agent
            return

    def boot_all(self) -> None:
        """Boot every appliance in waves: a broker flooded with connections times them all out."""
        codes = list(self.appliances)
        for wave in range(0, len(codes), BOOT_WAVE):
            threads = [
                threading.Thread(target=self.boot, args=(code,), name=f"boot-{code}", daemon=True)
                for code in codes[wave : wave + BOOT_WAVE]
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)

    def stop(self, code: str) -> None:
        """Switch the appliance off cleanly (it says goodbye)."""
        appliance = self.appliances[code]
        with appliance.lock:
            agent, appliance.agent = appliance.agent, None
        if agent is not None:
            agent.stop()

    def arm_power_cut(self, code: str, down_s: float) -> None:
        """Cut the power right after the relay next switches on, for `down_s`."""

        def cut() -> None:
            with self._cuts_lock:
                self.power_cuts += 1
            self.power_cut(code, down_s)

        self.appliances[code].relay.on_switch_on = cut

    def disarm(self, code: str) -> None:
        """Forget an armed power cut that did not happen."""
        self.appliances[code].relay.on_switch_on = None

    def power_cut(self, code: str, down_s: float) -> None:
        """Cut the power, stay down for `down_s`, boot again on the same journal."""
        appliance = self.appliances[code]
        with appliance.lock:
            agent, appliance.agent = appliance.agent, None
        if agent is None:
            return
        with contextlib.suppress(Exception):  # a racing stop already took it down
            agent.simulate_power_loss()
        time.sleep(down_s)
        self.boot(code)

    def stop_all(self) -> None:
        """Switch every appliance off cleanly."""
        for code in self.appliances:
            with contextlib.suppress(Exception):  # report, never hang, at the end
                self.stop(code)

    def outcome(self) -> FleetOutcome:
        """The runs started so far and the power cuts made."""
        with self._starts_lock:
            starts = tuple(self.starts)
        return FleetOutcome(starts, self.power_cuts)


def _worker_main(conn: multiprocessing.connection.Connection, spec: FleetSpec) -> None:
    """Serve the parent's calls on `conn` until it asks for the outcome or goes away."""
    if spec.log_level is not None:
        from roompay.logs import configure_logging  # noqa: PLC0415 - only in a worker

        configure_logging(logging.getLevelName(spec.log_level))
    fleet = LocalFleet(spec)
    send_lock = threading.Lock()
    calls: list[threading.Thread] = []

    def reply(call_id: int, ok: bool, value: object) -> None:
        with send_lock, contextlib.suppress(OSError):
            conn.send((call_id, ok, value))

    def serve(call_id: int, op: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            reply(call_id, True, op(*args))
        except Exception as exc:  # reported to the parent, which raises it
            log.exception("fleet worker call failed")
            reply(call_id, False, f"{type(exc).__name__}: {exc}")

    def halt() -> None:
        fleet.stopping.set()

    def finish() -> FleetOutcome:
        fleet.stopping.set()
        for thread in calls:
            thread.join(30)
        fleet.stop_all()
        return fleet.outcome()

    ops: dict[str, Callable[..., object]] = {
        "boot": fleet.boot,
        "boot_all": fleet.boot_all,
        "stop": fleet.stop,
        "arm_power_cut": fleet.arm_power_cut,
        "disarm": fleet.disarm,
        "halt": halt,
    }
    reply(-1, True, "ready")
    while True:
        try:
            call_id, name, args = conn.recv()
        except (EOFError, OSError):
            # The simulator is gone, and the broker with it: no goodbyes to wait for.
            return
        if name == "finish":
            serve(call_id, finish, ())
            return
        thread = threading.Thread(
            target=serve, args=(call_id, ops[name], args), name=f"call-{name}", daemon=True
        )
        calls.append(thread)
        thread.start()


# --- in the simulator ------------------------------------------------------------------


class _Worker:
    """One worker process and the calls waiting for its answers."""

    def __init__(self, spec: FleetSpec, index: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_worker_main, args=(child, spec), name=f"fleet-{index}", daemon=True
        )
        self._child = child
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._reader = threading.Thread(target=self._read, name=f"fleet-{index}-rx", daemon=True)
        self._ready: Future[Any] = Future()
        self._pending[-1] = self._ready

    def start(self, timeout_s: float = 60.0) -> None:
        self._process.start()
        self._child.close()
        self._reader.start()
        self._ready.result(timeout_s)

    def call(self, name: str, *args: object, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        future: Future[Any] = Future()
        with self._lock:
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                self._conn.send((call_id, name, args))
            except OSError as exc:
                self._pending.pop(call_id, None)
                raise RuntimeError(f"fleet worker is gone: {exc}") from exc
        return future.result(timeout_s)

    def join(self, timeout_s: float) -> None:
        if self._process.pid is None:
            return
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        self._conn.close()

    def _read(self) -> None:
        while True:
            try:
                call_id, ok, value = self._conn.recv()
            except (EOFError, OSError):
                with self._lock:
                    pending, self._pending = self._pending, {}
                for waiting in pending.values():
                    waiting.set_exception(RuntimeError("the fleet worker exited"))
                return
            with self._lock:
                future = self._pending.pop(call_id, None)
            if future is None:
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(RuntimeError(f"fleet worker: {value}"))


@dataclass
class Seat:
    """What the simulator knows of one appliance: its kind, and whether it left for good."""

    code: str
    kind: ApplianceKind
    gone: bool = False


class Fleet:
    """The whole simulated fleet, run by worker processes of at most `per_worker` appliances."""

    def __init__(
        self,
        codes: list[str],
        endpoint: MqttEndpoint,
        topic_root: str,
        journal_dir: Path,
        time_scale: float,
        secret_key: str,
        per_worker: int = DEVICES_PER_WORKER,
    ) -> None:
        if per_worker < 1:
            raise ValueError("per_worker must be positive")
        self.appliances = {code: Seat(code, kind_of(code)) for code in codes}
        count = max(1, math.ceil(len(codes) / per_worker))
        level = logging.getLogger().level if logging.getLogger().handlers else None
        shares = [codes[index::count] for index in range(count)]
        self._workers = [
            _Worker(
                FleetSpec(
                    tuple(share),
                    endpoint,
                    topic_root,
                    journal_dir,
                    time_scale,
                    secret_key,
                    level,
                ),
                index,
            )
            for index, share in enumerate(shares)
        ]
        self._owner = {
            code: worker
            for worker, share in zip(self._workers, shares, strict=True)
            for code in share
        }
        self._finished: FleetOutcome | None = None

    @property
    def workers(self) -> int:
        """How many processes run the fleet."""
        return len(self._workers)

    def start(self) -> None:
        """Start the worker processes and boot every appliance."""
        for worker in self._workers:
            worker.start()
        self._each("boot_all")

    def boot(self, code: str) -> None:
        """Boot the appliance again on its journal (blocks until it is connected or halted)."""
        self._owner[code].call("boot", code)

    def stop(self, code: str) -> None:
        """Switch the appliance off cleanly."""
        self._owner[code].call("stop", code)

    def arm_power_cut(self, code: str, down_s: float) -> None:
        """Cut the appliance's power right after its relay next switches on."""
        self._owner[code].call("arm_power_cut", code, down_s)

    def disarm(self, code: str) -> None:
        """Forget a power cut that did not happen."""
        self._owner[code].call("disarm", code)

    def halt(self) -> None:
        """Stop every boot still retrying: the run is over."""
        with contextlib.suppress(RuntimeError, TimeoutError):
            self._each("halt", timeout_s=30)

    def finish(self) -> FleetOutcome:
        """Switch every appliance off, end the workers, return what the appliances did."""
        if self._finished is not None:
            return self._finished
        outcomes: list[FleetOutcome] = self._each("finish")
        for worker in self._workers:
            worker.join(30)
        self._finished = FleetOutcome(
            tuple(start for outcome in outcomes for start in outcome.starts),
            sum(outcome.power_cuts for outcome in outcomes),
        )
        return self._finished

    def close(self) -> None:
        """End the workers however they are (cleanup after a failure)."""
        for worker in self._workers:
            worker.join(0)

    def _each(self, name: str, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        results: list[Any] = [None] * len(self._workers)
        errors: list[BaseException] = []

        def one(index: int, worker: _Worker) -> None:
            try:
                results[index] = worker.call(name, timeout_s=timeout_s)
            except BaseException as exc:  # re-raised below, in the caller's thread
                errors.append(exc)

        threads = [
            threading.Thread(target=one, args=(index, worker), daemon=True)
            for index, worker in enumerate(self._workers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


# --- the embedded broker, in a process of its own ---------------------------------------


def _broker_main(conn: multiprocessing.connection.Connection, log_level: int | None) -> None:
    """Run an embedded broker until the simulator says stop or goes away."""
    if log_level is not None:
        from roompay.logs import configure_logging  # noqa: PLC0415 - only in a broker process

        configure_logging(logging.getLevelName(log_level))
    broker = EmbeddedBroker()
    broker.start()
    conn.send(broker.port)
    with contextlib.suppress(EOFError, OSError):
        conn.recv()
    with contextlib.suppress(Exception):  # the process ends either way
        broker.stop()


class BrokerProcess:
    """An embedded broker in its own process: the simulator's threads do not slow it down.

    `crash` ends it with SIGKILL: every connection drops, every session and retained
    message is gone, as when a broker without persistence restarts.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        level = logging.getLogger().level if logging.getLogger().handlers else None
        self._process = context.Process(
            target=_broker_main, args=(child, level), name="embedded-broker", daemon=True
        )
        self._child = child
        self._port: int | None = None

    @property
    def endpoint(self) -> MqttEndpoint:
        """Where the broker listens."""
        if self._port is None:
            raise RuntimeError("the broker process is not started")
        return MqttEndpoint(host="127.0.0.1", port=self._port)

    @property
    def url(self) -> str:
        """The broker's mqtt:// URL."""
        return f"mqtt://127.0.0.1:{self.endpoint.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the process; return once the broker listens."""
        self._process.start()
        self._child.close()
        if not self._conn.poll(timeout_s):
            self.crash()
            raise RuntimeError("the embedded broker process did not start")
        self._port = int(self._conn.recv())

    def stop(self, timeout_s: float = 15.0) -> None:
        """Ask the broker to stop; kill it if it does not within `timeout_s`."""
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._process.join(timeout_s)
        self.crash()

    def crash(self) -> None:
        """End the broker at once (SIGKILL)."""
        if self._process.pid is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(10)

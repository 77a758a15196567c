"""Bare appliance responders: thousands of MQTT devices per process, answering like devices.

Each responder follows docs/protocol.md on the wire without the agent's journal or
checks: a retained `online` birth (and a `lost` last will), subscriptions to its own
`cmd/#`, a QoS 0 heartbeat every `heartbeat_s`, and for each `cmd/start` an
`accepted` ack then a `started` run event. It verifies nothing (the command's HMAC
is cheap, but the agent is measured elsewhere): the benchmark measures the server.
Runs end when the parent says so (`ended`, `completed`), so every appliance can
take a new order in the next phase.

The same responders answer the baseline, on the baseline's own topic root, with a
single ack and nothing else.

A fleet runs in a child process (`run_fleet`), driven over a pipe: the parent
sends `end`, `stats` or `quit`; the child answers each.
"""

import asyncio
import contextlib
import gc
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from typing import Any

from roompay.bench.mqtt import MiniMqtt, MqttError, Will

CONNECT_PARALLEL = 100


@dataclass(frozen=True)
class FleetSpec:
    """What one fleet process runs."""

    host: str
    port: int
    root: str
    base_root: str
    codes: list[str]
    heartbeat_s: float = 30.0


@dataclass
class _Run:
    run_id: str
    cmd_id: str
    order_id: str
    duration_s: int


@dataclass
class _Fleet:
    spec: FleetSpec
    clients: dict[str, MiniMqtt] = field(default_factory=dict)
    runs: dict[str, _Run] = field(default_factory=dict)
    answered: dict[str, str] = field(default_factory=dict)  # cmd_id -> run_id
    started: dict[str, float] = field(default_factory=dict)
    commands: int = 0
    baseline_commands: int = 0
    heartbeats: int = 0
    errors: list[str] = field(default_factory=list)
    stopping: bool = False
    boot_at: float = field(default_factory=time.monotonic)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _dump(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _handler(fleet: _Fleet, code: str) -> Any:
    spec = fleet.spec
    start_topic = f"{spec.root}/dev/{code}/cmd/start"
    base_topic = f"{spec.base_root}/dev/{code}/cmd/start"
    ack_topic = f"{spec.root}/dev/{code}/evt/ack"
    run_topic = f"{spec.root}/dev/{code}/evt/run"
    base_ack_topic = f"{spec.base_root}/dev/{code}/evt/ack"

    def on_message(topic: str, payload: bytes) -> None:
        client = fleet.clients[code]
        try:
            if topic == base_topic:
                fleet.baseline_commands += 1
                cmd_id = json.loads(payload)["cmd_id"]
                client.publish(base_ack_topic, _dump({"cmd_id": cmd_id, "status": "accepted"}), 1)
            elif topic == start_topic:
                fleet.commands += 1
                cmd = json.loads(payload)
                run = fleet.runs.get(code)
                earlier = fleet.answered.get(cmd["cmd_id"])
                if earlier is not None:
                    # A re-send of a command already answered (it may have run and ended
                    # since): the earlier answer again, as a duplicate (protocol §5, step 4).
                    ack = {"cmd_id": cmd["cmd_id"], "status": "duplicate", "run_id": earlier}
                    client.publish(ack_topic, _dump(ack | {"ts": _now()}), 1)
                    return
                if run is not None:
                    ack = {"cmd_id": cmd["cmd_id"], "status": "rejected", "reason": "busy"}
                    client.publish(ack_topic, _dump(ack | {"ts": _now()}), 1)
                    return
                run = _Run(uuid.uuid4().hex, cmd["cmd_id"], cmd["order_id"], cmd["duration_s"])
                fleet.runs[code] = run
                fleet.answered[run.cmd_id] = run.run_id
                ack = {"cmd_id": run.cmd_id, "status": "accepted", "run_id": run.run_id}
                client.publish(ack_topic, _dump(ack | {"ts": _now()}), 1)
                fleet.started[run.order_id] = time.perf_counter()
                client.publish(run_topic, _dump(_run_event(run, "started", 0)), 1)
            # run_ack and anything else: the PUBACK was all it needed.
        except (ValueError, KeyError, TypeError, MqttError) as exc:
            fleet.errors.append(f"{code}: {topic}: {exc!r}")

    return on_message


def _run_event(run: _Run, event: str, seq: int) -> dict[str, Any]:
    done = event == "ended"
    message: dict[str, Any] = {
        "run_id": run.run_id,
        "cmd_id": run.cmd_id,
        "order_id": run.order_id,
        "event": event,
        "seq": seq,
        "elapsed_s": run.duration_s if done else 0,
        "remaining_s": 0 if done else run.duration_s,
        "ts": _now(),
    }
    if done:
        message |= {"reason": "completed", "actual_run_s": run.duration_s}
    return message


async def _boot(fleet: _Fleet, code: str, gate: asyncio.Semaphore) -> None:
    spec = fleet.spec
    state = f"{spec.root}/dev/{code}/state"
    # The run's own client ids: the codes are the same in every run, and a broker shared by
    # two runs at once would otherwise hand each appliance's session from one to the other.
    client = MiniMqtt(f"{spec.root.split('/')[0]}-{code}", _handler(fleet, code))
    fleet.clients[code] = client
    will = Will(state, _dump({"state": "lost", "boot_id": 1}))
    async with gate:
        await client.connect(
            spec.host, spec.port, keepalive_s=int(max(60, 3 * spec.heartbeat_s)), will=will
        )
        await client.subscribe(
            [f"{spec.root}/dev/{code}/cmd/#", f"{spec.base_root}/dev/{code}/cmd/#"]
        )
        birth = {"state": "online", "boot_id": 1, "fw": "roompay-bench/1", "ts": _now()}
        client.publish(state, _dump(birth), qos=1, retain=True)


async def _heartbeats(fleet: _Fleet) -> None:
    """Each appliance beats every `heartbeat_s`, the fleet's beats spread evenly."""
    spec = fleet.spec
    codes = list(fleet.clients)
    tick_s = 0.1
    ticks = max(1, round(spec.heartbeat_s / tick_s))
    tick = 0
    next_at = time.monotonic()
    while not fleet.stopping:
        for code in codes[tick % ticks :: ticks]:
            client = fleet.clients[code]
            if client.closed.is_set():
                continue
            run = fleet.runs.get(code)
            beat: dict[str, Any] = {
                "uptime_s": int(time.monotonic() - fleet.boot_at),
                "relay_on": run is not None,
                "ts": _now(),
            }
            if run is not None:
                beat["run_id"] = run.run_id
            client.publish(f"{spec.root}/dev/{code}/evt/hb", _dump(beat), 0)
            fleet.heartbeats += 1
        tick += 1
        next_at += tick_s
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


def _end_runs(fleet: _Fleet) -> int:
    ended = 0
    for code, run in list(fleet.runs.items()):
        client = fleet.clients[code]
        client.publish(
            f"{fleet.spec.root}/dev/{code}/evt/run", _dump(_run_event(run, "ended", 1)), 1
        )
        del fleet.runs[code]
        ended += 1
    return ended


def _stats(fleet: _Fleet) -> dict[str, Any]:
    dropped = [c for c, client in fleet.clients.items() if client.closed.is_set()]
    return {
        "devices": len(fleet.clients),
        "commands": fleet.commands,
        "baseline_commands": fleet.baseline_commands,
        "heartbeats": fleet.heartbeats,
        "started": dict(fleet.started),
        "disconnected": len(dropped),
        "errors": fleet.errors[:20],
        "error_count": len(fleet.errors),
    }


async def _serve(spec: FleetSpec, conn: Connection) -> None:
    fleet = _Fleet(spec)
    started = time.perf_counter()
    gate = asyncio.Semaphore(CONNECT_PARALLEL)
    await asyncio.gather(*(_boot(fleet, code, gate) for code in spec.codes))
    # The connected appliances live as long as the process: out of the collector's
    # full passes, which would pause every appliance here at once (as in the server).
    gc.collect()
    gc.freeze()
    beats = asyncio.create_task(_heartbeats(fleet))
    conn.send(("ready", {"devices": len(fleet.clients), "s": time.perf_counter() - started}))
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: inbox.put_nowait(conn.recv()))
    while True:
        request = await inbox.get()
        if request[0] == "end":
            conn.send(("ended", _end_runs(fleet)))
        elif request[0] == "stats":
            conn.send(("stats", _stats(fleet)))
        elif request[0] == "quit":
            break
    fleet.stopping = True
    beats.cancel()
    stats = _stats(fleet)
    for code, client in fleet.clients.items():
        # Clear the retained birth: the broker keeps it forever otherwise.
        with contextlib.suppress(MqttError):
            client.publish(f"{spec.root}/dev/{code}/state", b"", qos=1, retain=True)
        await client.disconnect()
    await asyncio.sleep(0.2)
    conn.send(("bye", stats))


def run_fleet(spec: FleetSpec, conn: Connection) -> None:
    """Entry point of a fleet child process."""
    try:
        asyncio.run(_serve(spec, conn))
    except Exception as exc:
        conn.send(("failed", repr(exc)))
        raise

"""`roompay bench` in its smallest form: every section runs and reports figures.

No timing is asserted (the machine is shared); only that each measure happened,
with nothing lost: every order accepted, every start seen by every subscriber.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from roompay.bench import BenchOptions, Sizes, run_suite
from roompay.bench.cpu import CpuMeter, DatabaseProcesses, ProcessGroups, without_server_per_second
from roompay.bench.devices import FleetSpec
from roompay.bench.stack import Fleet
from roompay.protocol.mqtt_url import parse_mqtt_url
from tests.support.services import MOSQUITTO_URL, PG_ADMIN_URL

TINY = Sizes(
    name="tiny",
    orders={1: 3, 4: 6},
    fleet_devices=10,
    fleet_rate=10.0,
    fleet_s=0.5,
    feed_subscribers=3,
    feed_starts=2,
    feed_rate=10.0,
    heartbeat_s=2.0,
    warmup=2,
)


def _assert_complete(results: dict[str, Any]) -> None:
    assert [row["concurrency"] for row in results["pay_to_start"]] == [1, 4]
    for row in results["pay_to_start"]:
        for side in ("roompay", "baseline"):
            figures = row[side]
            assert figures["count"] == TINY.orders[row["concurrency"]]
            assert figures["errors"] == 0
            assert figures["p50_ms"] > 0
            assert figures["p99_ms"] >= figures["p50_ms"]
            assert figures["per_second"] > 0
            assert figures["cpu_ms_per_order"] >= 0
            by_process = figures["cpu_ms_by_process"]
            assert by_process["server"] == figures["cpu_ms_per_order"]
            parts = ("server", "database", "broker", "appliances", "load")
            assert by_process["total"] == pytest.approx(sum(by_process[p] for p in parts), abs=0.01)
        assert row["ratio_p50"] > 0
        assert row["ratio_per_second"] > 0
    # CPU is counted in clock ticks: a handful of tiny orders may fit in one, not all nine
    assert sum(row["roompay"]["cpu_ms_per_order"] for row in results["pay_to_start"]) > 0
    assert results["checkout"]["count"] == 3
    assert results["checkout"]["p50_ms"] > 0
    fleet = results["fleet"]
    assert fleet["devices"] == 10
    assert (fleet["orders"], fleet["accepted"], fleet["errors"]) == (5, 5, 0)
    assert fleet["server_rss_mb"] > 0
    assert fleet["broker_rss_mb"] > 0
    feed = results["feed"]
    assert (feed["subscribers"], feed["starts"], feed["missed"], feed["errors"]) == (3, 2, 0, 0)
    assert feed["all_seen_p99_ms"] > 0
    assert {check["target"].split(" ")[0] for check in results["targets"]} >= {"pay->start"}
    # every order the bench paid was booked once, ran once and ended; the ledger balances
    counts = results["audit"]
    paid_by_bench = sum(TINY.orders.values()) + TINY.warmup + TINY.feed_orders + fleet["orders"]
    assert counts["paid"] == paid_by_bench
    assert counts["violations"] == 0, counts


@pytest.mark.timeout(60)
def test_the_smallest_bench_on_sqlite_and_the_embedded_broker_reports_every_figure(
    tmp_path: Path,
) -> None:
    results = run_suite(BenchOptions(sizes=TINY, embedded=True, work_dir=tmp_path))

    _assert_complete(results)
    assert results["backend"] == "SQLite + embedded broker"


@pytest.mark.services
@pytest.mark.timeout(60)
def test_the_smallest_bench_on_postgres_and_mosquitto_reports_every_figure(
    tmp_path: Path,
) -> None:
    results = run_suite(
        BenchOptions(
            sizes=TINY, postgres_url=PG_ADMIN_URL, mqtt_url=MOSQUITTO_URL, work_dir=tmp_path
        )
    )

    _assert_complete(results)
    assert results["backend"] == "PostgreSQL + Mosquitto"


BUSY_THEN_IDLE = """
import sys, time
began = time.process_time()
while time.process_time() - began < 0.3:
    pass
print("busy done", flush=True)
time.sleep(60)
"""


def test_the_cpu_meter_charges_a_process_its_cpu_time_per_order() -> None:
    busy = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE], stdout=subprocess.PIPE)
    try:
        groups = ProcessGroups(
            server=busy.pid, database=list, broker=None, appliances=list, load=os.getpid()
        )
        meter = CpuMeter(groups).start()
        assert busy.stdout is not None
        assert busy.stdout.readline() == b"busy done\n"

        figures = meter.per_order(10)
    finally:
        busy.kill()
        busy.communicate()

    # 0.3 s of CPU over 10 orders, counted in clock ticks (10 ms) from a start that may
    # come after the interpreter's own start-up: at least 30 ms a order, less a tick
    assert figures["server"] >= 29.0
    assert (figures["database"], figures["broker"], figures["appliances"]) == (0.0, 0.0, 0.0)
    assert figures["total"] == pytest.approx(figures["server"] + figures["load"], abs=0.01)
    assert without_server_per_second(figures, 2) == (
        round(2000 / figures["load"]) if figures["load"] else 0.0
    )


@pytest.mark.services
def test_the_database_processes_are_its_own_backends_and_the_cluster_background(
    postgres_url: str,
) -> None:
    libpq_url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    processes = DatabaseProcesses(libpq_url)
    try:
        with psycopg.connect(libpq_url) as ours, psycopg.connect(PG_ADMIN_URL) as elsewhere:
            found = processes()
            assert ours.info.backend_pid in found
            assert elsewhere.info.backend_pid not in found
            # the WAL writer writes every database's commits
            assert len(found) >= 3
    finally:
        processes.close()


@pytest.mark.services
@pytest.mark.timeout(60)
def test_two_runs_on_one_broker_keep_their_appliances_connected() -> None:
    endpoint = parse_mqtt_url(MOSQUITTO_URL)
    codes = [f"B{n:05d}" for n in range(1, 4)]  # every run seeds the same codes
    fleets = [Fleet(), Fleet()]
    try:
        for run, fleet in enumerate(fleets):
            root = f"bench{uuid.uuid4().hex[:8]}"
            spec = FleetSpec(endpoint.host, endpoint.port, f"{root}/v1", f"{root}/base", codes)
            fleet.start([spec])
            assert fleet.stats()["disconnected"] == 0, f"run {run}"
        # the second run's appliances took nothing from the first's: the broker drops a
        # session it hands over before it answers the new connection, so it is seen by now
        assert [fleet.stats()["disconnected"] for fleet in fleets] == [0, 0]
    finally:
        for fleet in fleets:
            fleet.stop()

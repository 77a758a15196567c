"""Two server processes on one PostgreSQL and one Mosquitto, both dispatching, one killed.

The fleet simulator runs both servers: guests check out on either, each server names
the other as its public address (so a payment's notifications reach the other
process than its checkout), both run the dispatcher and the refund worker, and with
faults the first one is killed with SIGKILL and started again mid-run. The outbox
and the refunds are claimed with FOR UPDATE SKIP LOCKED and each refund has one
key, so nothing may start twice or be refunded twice.
"""

from pathlib import Path

import pytest

from roompay.simulate import FaultKind, Invariant, SimulationOptions, simulate
from tests.support.services import MOSQUITTO_URL, scratch_postgres_database


@pytest.mark.services
@pytest.mark.timeout(150)
def test_two_servers_one_killed_mid_run_never_start_or_refund_an_order_twice(
    tmp_path: Path,
) -> None:
    # Given two servers on one PostgreSQL and one Mosquitto, and a faulty small fleet
    with scratch_postgres_database() as database_url:
        report = simulate(
            SimulationOptions(
                devices=6,
                orders=30,
                faults=True,
                seed=23,
                database_url=database_url,
                mqtt_url=MOSQUITTO_URL,
                data_dir=tmp_path,
                servers=2,
            )
        )

    # Then every invariant held: no double start, no double refund, nothing unsettled
    assert report.violations == []
    assert report.invariants[Invariant.AT_MOST_ONE_RUN.name.lower()] == 0
    assert report.invariants[Invariant.REFUND_ONCE_PER_KEY.name.lower()] == 0
    assert report.invariants[Invariant.REFUND_WITHIN_PAID.name.lower()] == 0
    assert report.orders_placed == 30
    # And the first server was killed and came back while the second went on
    assert report.faults_injected[FaultKind.SERVER_KILL.value] == 1
    assert sorted(p.name for p in tmp_path.glob("server*.log")) == [
        "server-1.log",
        "server-2.log",
        "server2-1.log",
    ]
    # And both servers took checkouts and applied payments the other had checked out
    for log_name in ("server-1.log", "server2-1.log"):
        text = (tmp_path / log_name).read_text()
        assert "checkout created" in text
        assert "payment evidence handled" in text

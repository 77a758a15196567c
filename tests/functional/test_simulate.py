"""The fleet simulator: a small faulty run holds every invariant, and the checker can fail."""

from pathlib import Path

import pytest

from roompay.payments.base import RefundState
from roompay.simulate import (
    STUCK_NO_QR,
    FaultKind,
    History,
    Invariant,
    OrderFacts,
    RefundFacts,
    RunStart,
    SimulationOptions,
    check_history,
    plan_orders,
    simulate,
)
from tests.support.services import MOSQUITTO_URL, scratch_postgres_database


def _assert_clean_faulty_run(options: SimulationOptions) -> None:
    report = simulate(options)
    workers = -(-options.devices // options.devices_per_worker)
    split = f"{options.devices} appliances in {workers} worker process(es), 1 server process(es)"
    assert split in report.notes
    assert report.violations == []
    assert report.orders_placed == options.orders
    # A checkout the server was killed in the middle of leaves an order its guest never
    # saw (the guest checked out again): the unpaid sweep expires it, nothing is stuck.
    assert report.outcomes.get(STUCK_NO_QR, 0) == 0
    assert sum(report.outcomes.values()) >= options.orders
    assert {kind for kind, count in report.faults_injected.items() if count == 0} == set()
    assert set(report.faults_injected) == {kind.value for kind in FaultKind}


@pytest.mark.timeout(240)
def test_a_faulty_run_on_sqlite_and_the_embedded_broker_holds_every_invariant(
    tmp_path: Path,
) -> None:
    # Three appliances per worker process: the fleet is split as a large one is.
    options = SimulationOptions(
        devices=6, orders=20, faults=True, seed=7, data_dir=tmp_path, devices_per_worker=3
    )
    _assert_clean_faulty_run(options)
    assert (tmp_path / "devices").is_dir()


@pytest.mark.services
@pytest.mark.timeout(240)
def test_a_faulty_run_on_postgres_and_mosquitto_holds_every_invariant(tmp_path: Path) -> None:
    with scratch_postgres_database() as database_url:
        _assert_clean_faulty_run(
            SimulationOptions(
                devices=6,
                orders=20,
                faults=True,
                seed=11,
                database_url=database_url,
                mqtt_url=MOSQUITTO_URL,
                data_dir=tmp_path,
            )
        )


def test_the_plan_is_the_same_for_the_same_seed_and_has_every_guest_fault() -> None:
    first = plan_orders(50, 6, faults=True, seed=3)
    assert first == plan_orders(50, 6, faults=True, seed=3)
    assert first != plan_orders(50, 6, faults=True, seed=4)
    assert any(p.duplicate_notify for p in first)
    assert any(p.reboot for p in first)
    assert {p.offline for p in first} >= {"later", "never"}


def _paid_order(order_id: str, runs_in_db: int = 1) -> OrderFacts:
    return OrderFacts(order_id, "completed", 800, 800, None, runs_in_db)


def test_the_checker_passes_a_clean_history() -> None:
    history = History(orders=[_paid_order("o1")], starts=[RunStart("DRY-0001", "o1", "r1", "c1")])
    assert check_history(history) == ([], 0)


def test_the_checker_catches_a_double_start() -> None:
    history = History(
        orders=[_paid_order("o1")],
        starts=[
            RunStart("DRY-0001", "o1", "r1", "c1"),
            RunStart("DRY-0001", "o1", "r2", "c1"),
        ],
    )
    violations, _ = check_history(history)
    assert [(v.invariant, v.key) for v in violations] == [(Invariant.AT_MOST_ONE_RUN, "o1")]


def test_the_checker_catches_a_run_without_payment_and_an_unrefunded_failed_start() -> None:
    unpaid = OrderFacts("o1", "expired", 800, None, None, 0)
    stranded = OrderFacts(
        "o2",
        "refunded",
        800,
        800,
        None,
        0,
        (
            RefundFacts(
                "o2-start", 700, "refunded", "start_deadline_passed", RefundState.SUCCESS.value, 700
            ),
        ),
    )
    history = History(orders=[unpaid, stranded], starts=[RunStart("DRY-0001", "o1", "r1", "c1")])
    violations, _ = check_history(history)
    assert [(v.invariant, v.key) for v in violations] == [
        (Invariant.NO_RUN_WITHOUT_PAYMENT, "o1"),
        (Invariant.PAID_RAN_OR_REFUNDED, "o2"),
    ]


def test_the_checker_catches_a_refund_the_provider_paid_differently_and_an_unbalanced_ledger() -> (
    None
):
    order = OrderFacts(
        "o1",
        "refunded",
        800,
        800,
        None,
        0,
        (
            RefundFacts(
                "o1-start",
                800,
                "refunded",
                "start_deadline_passed",
                RefundState.SUCCESS.value,
                1600,
            ),
        ),
    )
    history = History(orders=[order], starts=[], unbalanced_entries=[5], ledger_sum_fen=3)
    violations, _ = check_history(history)
    assert [(v.invariant, v.key) for v in violations] == [
        (Invariant.REFUND_ONCE_PER_KEY, "o1"),
        (Invariant.LEDGER_BALANCED, "entry 5"),
        (Invariant.LEDGER_BALANCED, "ledger"),
    ]

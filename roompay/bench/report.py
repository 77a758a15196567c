"""The benchmark's figures as Rich tables, JSON, and the issue's targets checked."""

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from roompay.bench.cpu import COMPONENTS


def ratio(value: float, base: float) -> float:
    """`value / base`, 0 when there is no base."""
    return round(value / base, 2) if base else 0.0


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The performance issue's targets, each with the measured value and whether it holds."""
    rows = {row["concurrency"]: row for row in results["pay_to_start"]}
    checks: list[dict[str, Any]] = []
    if 1 in rows:
        checks.append(_check("pay->start p50 at c=1 within 2x baseline", rows[1]["ratio_p50"], 2.0))
        checks.append(_check("pay->start p99 at c=1 within 3x baseline", rows[1]["ratio_p99"], 3.0))
    if 16 in rows:
        share = rows[16]["ratio_per_second"]
        checks.append(
            {
                "target": "throughput at c=16 >= 50% of baseline",
                "value": share,
                "met": share >= 0.5,
            }
        )
    fleet = results.get("fleet")
    if fleet:
        checks.append(
            {
                "target": f"{fleet['devices']} appliances: server RSS < 500 MB, zero errors",
                "value": f"{fleet['server_rss_mb']} MB, {fleet['errors']} errors",
                "met": fleet["server_rss_mb"] < 500 and fleet["errors"] == 0,
            }
        )
    counts = results.get("audit")
    if counts:
        checks.append(
            {
                "target": f"every invariant holds after the load ({counts['paid']} paid orders)",
                "value": f"{counts['violations']} broken",
                "met": counts["violations"] == 0 and counts["paid"] > 0,
            }
        )
    feed = results.get("feed")
    if feed:
        checks.append(
            {
                "target": f"feed fan-out to {feed['subscribers']} subscribers p99 < 100 ms",
                "value": feed["all_seen_p99_ms"],
                "met": feed["errors"] == 0 and 0 < feed["all_seen_p99_ms"] < 100,
            }
        )
    return checks


def _check(name: str, value: float, limit: float) -> dict[str, Any]:
    return {"target": name, "value": value, "met": 0 < value <= limit}


def tables(results: dict[str, Any]) -> list[Table]:
    """The tables printed at the end of a run."""
    main = Table(title=f"pay -> start, {results['backend']} ({results['mode']})")
    for column in (
        "c",
        "n",
        "roompay p50 ms",
        "p99 ms",
        "orders/s",
        "baseline p50 ms",
        "p99 ms",
        "orders/s",
        "ratio p50",
        "ratio p99",
        "ratio orders/s",
        "errors",
    ):
        main.add_column(column, justify="right")
    for row in results["pay_to_start"]:
        ours, base = row["roompay"], row["baseline"]
        main.add_row(
            str(row["concurrency"]),
            str(ours["count"]),
            f"{ours['p50_ms']:.2f}",
            f"{ours['p99_ms']:.2f}",
            f"{ours['per_second']:.0f}",
            f"{base['p50_ms']:.2f}",
            f"{base['p99_ms']:.2f}",
            f"{base['per_second']:.0f}",
            f"{row['ratio_p50']:.2f}",
            f"{row['ratio_p99']:.2f}",
            f"{row['ratio_per_second']:.2f}",
            f"{ours['errors']}/{base['errors']}",
        )
    stages = Table(title="where roompay's pay -> start goes: medians between recorded steps, ms")
    names = [name for row in results["pay_to_start"] for name in row["roompay"]["stages_ms"]]
    columns = list(dict.fromkeys(names))
    stages.add_column("c", justify="right")
    stages.add_column("notify answered", justify="right")
    for name in columns:
        stages.add_column(name.replace("command_", "cmd "), justify="right")
    for row in results["pay_to_start"]:
        ours = row["roompay"]
        stages.add_row(
            str(row["concurrency"]),
            f"{ours['notify_p50_ms']:.1f}",
            *(f"{ours['stages_ms'].get(name, 0.0):.1f}" for name in columns),
        )
    other = Table(title="checkout, fleet, feed")
    for column in ("measure", "figures"):
        other.add_column(column)
    checkout = results["checkout"]
    base_p50 = results["pay_to_start"][0]["baseline"]["p50_ms"] if results["pay_to_start"] else 0
    other.add_row(
        "checkout (order + provider call + QR), c=1",
        f"n={checkout['count']}  p50 {checkout['p50_ms']:.1f} ms  p99 {checkout['p99_ms']:.1f} ms"
        f"  (p50 = {ratio(checkout['p50_ms'], base_p50):.1f}x baseline pay->start p50)",
    )
    fleet = results.get("fleet")
    if fleet:
        other.add_row(
            f"fleet: {fleet['devices']} appliances, {fleet['rate_per_s']:.0f} orders/s"
            f" for {fleet['duration_s']:.0f} s",
            f"accepted {fleet['accepted']}/{fleet['orders']}  p50 {fleet['p50_ms']:.1f} ms"
            f"  p99 {fleet['p99_ms']:.1f} ms  errors {fleet['errors']}"
            f"  server RSS {fleet['server_rss_mb']:.0f} MB  broker RSS"
            f" {fleet['broker_rss_mb']:.0f} MB  heartbeats {fleet['heartbeats']}"
            f"  (connect {fleet['connect_s']:.0f} s)",
        )
    feed = results.get("feed")
    if feed:
        other.add_row(
            f"feed: {feed['subscribers']} subscribers, {feed['starts']} starts",
            f"all saw it: p50 {feed['all_seen_p50_ms']:.1f} ms  p99"
            f" {feed['all_seen_p99_ms']:.1f} ms; each: p50 {feed['each_p50_ms']:.1f} ms"
            f"  p99 {feed['each_p99_ms']:.1f} ms; missed {feed['missed']}",
        )
    counts = results.get("audit")
    if counts:
        other.add_row(
            "after the load: every order audited",
            f"{counts['orders']} orders, {counts['paid']} paid; paid not booked once"
            f" {counts['paid_not_booked_once']}, not run once {counts['paid_not_run_once']},"
            f" in flight {counts['paid_in_flight']}; runs without payment"
            f" {counts['run_without_payment']}; unbalanced entries"
            f" {counts['unbalanced_entries']}; accounts sum {counts['ledger_sum_fen']} fen",
        )
    goals = Table(title="targets")
    for column in ("target", "measured", "met"):
        goals.add_column(column)
    for check in results["targets"]:
        goals.add_row(check["target"], str(check["value"]), "yes" if check["met"] else "NO")
    return [main, stages, _cpu_table(results), other, goals]


def _cpu_table(results: dict[str, Any]) -> Table:
    """CPU per order by process, roompay's and in brackets the baseline's."""
    table = Table(
        title="CPU per order by process, ms: roompay (baseline); and what a free server would allow"
    )
    table.add_column("c", justify="right")
    for name in (*COMPONENTS, "total"):
        table.add_column("load generator" if name == "load" else name, justify="right")
    table.add_column("orders/s if the server cost nothing", justify="right")
    table.add_column("50% of baseline orders/s", justify="right")
    for row in results["pay_to_start"]:
        ours = row["roompay"].get("cpu_ms_by_process", {})
        base = row["baseline"].get("cpu_ms_by_process", {})
        table.add_row(
            str(row["concurrency"]),
            *(
                f"{ours.get(name, 0.0):.2f} ({base.get(name, 0.0):.2f})"
                for name in (*COMPONENTS, "total")
            ),
            f"{row['roompay'].get('without_server_per_second', 0):.0f}",
            f"{row['baseline']['per_second'] / 2:.0f}",
        )
    return table


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    """Print the tables."""
    console = console or Console(width=160)
    for table in tables(results):
        console.print(table)
    anomalies = {name: count for name, count in results.get("anomalies", {}).items() if count}
    if anomalies:
        console.print(f"anomalies: {anomalies}")
    console.print(
        f"{results['machine']['cpus']} CPUs, Python {results['machine']['python']},"
        f" {results['duration_s']:.0f} s in all"
    )


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write the results as JSON."""
    path.write_text(json.dumps(results, indent=2))

"""Prometheus metrics, one registry per app (no global state)."""

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SnapshotCollector(Collector):
    """Reads orders by status and connected devices from the database at scrape time."""

    def __init__(
        self, orders_by_status: Callable[[], dict[str, int]], devices_online: Callable[[], int]
    ) -> None:
        self._orders_by_status = orders_by_status
        self._devices_online = devices_online

    def collect(self) -> Iterable[GaugeMetricFamily]:
        orders = GaugeMetricFamily("roompay_orders", "Orders by status", labels=["status"])
        for status, count in sorted(self._orders_by_status().items()):
            orders.add_metric([status], count)
        yield orders
        yield GaugeMetricFamily(
            "roompay_devices_connected", "Devices online now", value=self._devices_online()
        )


class Metrics:
    """The server's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.notify_seconds = Histogram(
            "roompay_notify_seconds",
            "Time to handle a provider payment notification",
            ["wallet", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.command_seconds = Histogram(
            "roompay_command_seconds",
            "Time from payment to the device accepting the start command",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch_snapshot(
        self, orders_by_status: Callable[[], dict[str, int]], devices_online: Callable[[], int]
    ) -> None:
        """Register the gauges computed from the database at each scrape."""
        self.registry.register(_SnapshotCollector(orders_by_status, devices_online))

"""`roompay bench`: performance figures measured on this machine, against its own baseline.

`suite` runs the whole benchmark (pay -> start, checkout, fleet, feed, and the bare
baseline in the same run); `journey` keeps the older single-process figures.
"""

from roompay.bench.journey import (
    JourneyFigures,
    NotifyFigures,
    run_journeys,
    run_notify_bench,
    write_json,
)
from roompay.bench.suite import FULL, QUICK, SMOKE, BenchOptions, Sizes, run_suite

__all__ = [
    "FULL",
    "QUICK",
    "SMOKE",
    "BenchOptions",
    "JourneyFigures",
    "NotifyFigures",
    "Sizes",
    "run_journeys",
    "run_notify_bench",
    "run_suite",
    "write_json",
]

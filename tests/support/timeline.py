"""What tests expect of an order's timeline."""

PAID_RUN_STEPS = [
    "created",
    "qr_issued",
    "paid",
    "command_queued",
    "command_sent",
    "command_accepted",
    "started",
    "ended",
]
"""The steps of an order paid by notify, started at once and run to its end, in order."""

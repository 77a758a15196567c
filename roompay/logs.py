"""Structured JSON logs; every line about an order carries its `order_id`."""

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

_order_id: ContextVar[str | None] = ContextVar("order_id", default=None)


@contextlib.contextmanager
def order_context(order_id: str) -> Iterator[None]:
    """Tag every log line written inside the block with this order id."""
    token = _order_id.set(order_id)
    try:
        yield
    finally:
        _order_id.reset(token)


class _OrderIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "order_id", None) is None:
            record.order_id = _order_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, order_id and extras."""

    _standard = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._standard and value is not None:
                entry[key] = value if isinstance(value, int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """Send JSON lines to stderr for the roompay loggers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_OrderIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("amqtt", "transitions", "httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

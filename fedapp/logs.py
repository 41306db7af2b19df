"""Route this app's log records through Flower's logger.

Flower streams its own logger to ``flwr run --stream`` and to the SuperLink/SuperNode logs; records
of plain module loggers would be dropped there. Forwarding keeps our modules' ``getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import os

from flwr.common.logger import FLOWER_LOGGER

APP_PACKAGES = ("fedapp", "datasets", "strategies")


class _ToFlowerLogger(logging.Handler):
    # To Flower's handlers only: the record still propagates normally to the root logger, so
    # whoever listens there (pytest's caplog, a user's logging config) sees it exactly once.
    def emit(self, record: logging.LogRecord) -> None:
        for handler in FLOWER_LOGGER.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def app_log_level() -> int:
    """INFO, or DEBUG where ``FLWR_LOG_LEVEL=DEBUG`` (Flower's own switch, which also lowers its
    console handler): the clients' per-step losses are debug lines."""
    return logging.DEBUG if os.environ.get("FLWR_LOG_LEVEL", "").upper() == "DEBUG" else logging.INFO


def route_app_logs_to_flower(level: int | None = None) -> None:
    """Idempotently attach the forwarding handler to the app's package loggers (at ``level``,
    default :func:`app_log_level`)."""
    level = app_log_level() if level is None else level
    for name in APP_PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _ToFlowerLogger) for h in logger.handlers):
            logger.addHandler(_ToFlowerLogger())

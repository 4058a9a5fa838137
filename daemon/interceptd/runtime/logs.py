"""structlog set-up: JSON lines for journald and log collectors, readable lines for a person at a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger


def configure(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """`fmt` is auto (console on a tty, JSON otherwise), json or console; `level` a logging level name."""
    out = sys.stderr if stream is None else stream
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer(colors=out.isatty()) if console else \
        structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get(**bound: Any) -> FilteringBoundLogger:
    """A logger with `bound` fields on every event (e.g. the table name)."""
    logger: FilteringBoundLogger = structlog.get_logger("interceptd")
    return logger.bind(**bound)

"""structlog set-up: JSON lines for journald, a console renderer for humans, picked by ``auto``."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto`` is ``console`` when ``stream`` is a terminal (a person reads it) and ``json`` otherwise
    (journald, a file, a pipe)."""
    if fmt != "auto":
        return fmt
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "json"


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the time of each write. Binding the object seen at configure
    time breaks once it is replaced and closed (a test's capture, a redirected CLI run)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog once, from the composition root. ``fmt``: auto, json or console.
    Without ``stream`` it writes to the current ``sys.stderr``."""
    renderer: structlog.types.Processor
    if resolve_format(fmt, stream or sys.stderr) == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or _CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )

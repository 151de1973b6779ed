"""Structured logs: one JSON object per line on stdout (journald), DESIGN §3.4.

``configure_logging`` installs one handler on the stdlib root logger whose formatter is structlog's
``ProcessorFormatter``. structlog loggers hand their event dict to that handler; third-party stdlib
records (APScheduler, watchdog, ...) are run through the same pre-processing chain, so every line has
the same keys whichever library produced it::

    {"event": "merged", "expert": "3f2a...", "step": 4, "version": 5,
     "level": "info", "logger": "mergewatch", "timestamp": "2025-01-01T12:00:00.123456Z"}

Context: ``get_logger(expert=..., step=...)`` binds keys onto one logger; ``bound_context(...)`` binds
them for the current thread / task (``contextvars``), so they also appear on records emitted by code
that knows nothing of them (including third-party stdlib loggers called inside the block).

On a terminal (``json=None`` and the stream is a TTY) lines are rendered for humans instead.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars, unbind_contextvars

__all__ = [
    "configure_logging",
    "get_logger",
    "bound_context",
    "bind_context",
    "unbind_context",
    "clear_context",
    "LOGGER_NAME",
]

LOGGER_NAME = "mergewatch"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

#: Chatty third-party loggers held at WARNING unless the daemon runs at debug level: APScheduler logs
#: two INFO lines per job run ("Running job", "executed successfully"), i.e. every heartbeat.
QUIET_LOGGERS = ("apscheduler.executors",)

# Names re-exported so callers need not import structlog themselves.
bound_context = bound_contextvars
bind_context = bind_contextvars
unbind_context = unbind_contextvars
clear_context = clear_contextvars


class _StdoutHandler(logging.StreamHandler):
    """A stream handler that looks ``sys.stdout`` up at every record.

    The stream is resolved late so that redirections made after configuration (pytest's capture,
    ``contextlib.redirect_stdout``) are honoured.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stdout

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ assigns it
        pass


def _shared_processors() -> list[Any]:
    """Run on every record: structlog events and foreign stdlib records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(*, json: bool | None = None, level: str = "info", stream: IO[str] | None = None) -> logging.Handler:
    """Route structlog and all stdlib logging to ``stream`` (default: stdout) as JSON lines.

    ``json=None`` picks JSON unless the stream is a terminal. Calling it again replaces the handler
    it installed before (never duplicates it). Returns the installed handler.
    """
    try:
        lvl = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; allowed: {', '.join(LEVELS)}") from None

    handler: logging.Handler = _StdoutHandler() if stream is None else logging.StreamHandler(stream)
    if json is None:
        target = sys.stdout if stream is None else stream
        isatty = getattr(target, "isatty", None)
        json = not (callable(isatty) and isatty())

    if json:
        renderer: list[Any] = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(default=str)]
    else:
        # ConsoleRenderer formats exc_info itself (format_exc_info before it would flatten it).
        renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=_shared_processors(),
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    handler._mergewatch = True  # type: ignore[attr-defined]  # marks the handler we own

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mergewatch", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(lvl)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if lvl <= logging.DEBUG else max(lvl, logging.WARNING))
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a logger created before a re-configuration follows the new configuration.
        cache_logger_on_first_use=False,
    )
    return handler


def get_logger(name: str = LOGGER_NAME, /, **context: Any) -> structlog.stdlib.BoundLogger:
    """A structlog logger with ``context`` bound (e.g. ``get_logger(expert=eid, step=4)``)."""
    return structlog.stdlib.get_logger(name).bind(**context)

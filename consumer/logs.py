"""Process logging: JSON lines in production, readable console output on demand.

JSON lines are encoded by pydantic-core (compiled) rather than ``json.dumps``.
Our own lines go through structlog's native path (a level-filtering logger
writing straight to the stream): the worker writes two lines per command, and
the stdlib ``logging`` machinery added a LogRecord, handler dispatch and a
second formatting pass to each. The stdlib records of libraries go
through the same processors and renderer, so one process still writes one
format to one stream.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from pydantic_core import to_json


def configure(log_format: str = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[Any] = (
        [structlog.dev.ConsoleRenderer(colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback)]
        if log_format == "console"
        else [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_json)]
    )
    structlog.configure(
        processors=[*shared, *rendering],
        # Filtered by level before anything else: a debug call in production costs a method call.
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiormq", "aio_pika", "transitions", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _json(event: dict[str, Any], **_: Any) -> str:
    """pydantic-core's JSON encoder (compiled): about a quarter less CPU per line than ``json.dumps``.
    Anything it can't encode is written as its ``str()``, as structlog's own fallback does."""
    return to_json(event, fallback=str).decode()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)

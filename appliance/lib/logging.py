"""Logging set-up (called by entry points, never at import), and the request context every log line carries.

Each HTTP request binds its request id, route and trace id when it starts (:func:`request_context_middleware`)
and its tenant and workflow once authenticated (:func:`bind`); a filter copies them onto every record logged
while the request runs, in its task or in the worker threads it starts (contextvars follow both). With
``server.log_format = "json"`` each line is one JSON object.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = ("request_id", "route", "trace_id", "tenant", "workflow")
_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("appliance_log_context", default=None)


def bind(**fields: str | None) -> None:
    """Add fields to the current request's log context (None values are left out)."""
    _context.set({**context(), **{key: value for key, value in fields.items() if value is not None}})


def reset_context() -> contextvars.Token[dict[str, str] | None]:
    return _context.set({})


def restore_context(token: contextvars.Token[dict[str, str] | None]) -> None:
    _context.reset(token)


def context() -> dict[str, str]:
    return _context.get() or {}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in context().items():
            setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [f"{key}={getattr(record, key)}" for key in CONTEXT_FIELDS if getattr(record, key, None)]
        return f"{text} [{' '.join(extra)}]" if extra else text


def configure_logging(level: str = "info", log_format: str = "text") -> None:
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
        elif handler.formatter is None:
            handler.setFormatter(TextFormatter())
    logging.getLogger("appliance").setLevel(level.upper())

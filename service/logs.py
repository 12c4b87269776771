"""Logging setup: plain lines for people, or one JSON object per line (``ALIGND_LOG_JSON=true``) for collectors.

The request id (set by the API middleware) and the job id (set by the worker around a run) live in context
variables, so every log line written while handling them carries them without being passed around.
Standard library only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from service.settings import Settings

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("alignd_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("alignd_job_id", default=None)

# LogRecord attributes that are not "extra" fields a caller attached.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "job_id",
}


class ContextFilter(logging.Filter):
    """Copies the request and job ids onto every record (also for the plain formatter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "job_id"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Install our stderr handler on the root logger (replacing one installed before: safe to call twice)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._alignd = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_alignd", False):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn's loggers propagate to root, so access and error lines come out in the same format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True

"""One-line structured logs to stderr: ``ts level service message key=value ...``.

``setup_logging(service)`` configures the root logger once per process
(calling it again replaces its own handler, not anyone else's). Extra fields
come from ``log.info("msg", extra={"request_id": rid})``; values containing
spaces, quotes, '=' or control characters are quoted (``quote``: use it too
for an outside value formatted into a message's own key=value text, so it
cannot forge a field). Exceptions are appended as one ``exc="..."`` field with
newlines escaped, so every record stays one line.
Level: the argument, else ``DISAGG_LOG_LEVEL``, else INFO.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

LEVEL_ENV = "DISAGG_LOG_LEVEL"

# Attributes every LogRecord has; anything else on a record came from extra=.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def quote(value: object) -> str:
    """value as one key=value token: bare when safe, else double-quoted with
    backslash escapes (control characters as Python writes them: \\n, \\x1b ...)."""
    text = str(value)
    if text and not any(c in text for c in ' "=\\') and text.isprintable():
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    if c.isprintable():
        return c
    return ascii(c)[1:-1]  # \xNN, \uNNNN or \UNNNNNNNN


class OneLineFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\n", "\\n").replace("\r", "\\r")
        parts = [self.formatTime(record), record.levelname, self.service, message]
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        parts += [f"{k}={quote(v)}" for k, v in extras.items()]
        parts.append(f"logger={record.name}")
        if record.exc_info:
            parts.append(f"exc={quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class _DisaggHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it."""


def _level(level: str | int | None) -> int:
    chosen = level if level is not None else os.environ.get(LEVEL_ENV, "INFO")
    if isinstance(chosen, int):
        return chosen
    value = logging.getLevelName(chosen.strip().upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {chosen!r}")
    return value


def setup_logging(
    service_name: str, level: str | int | None = None, stream: TextIO | None = None
) -> None:
    """Routes every logger to stderr (or stream) as one-line records tagged service_name."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DisaggHandler)]:
        root.removeHandler(old)
    handler = _DisaggHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(OneLineFormatter(service_name))
    root.addHandler(handler)
    root.setLevel(_level(level))

"""Logging for an unattended bot: one line per event, optionally JSON, no secrets, no texts.

Two promises hold for every line at INFO and above:
- users' message texts never appear. Convention: code logs a text only at DEBUG, and wraps it
  in :class:`UserText`; the filter here blanks a wrapped text in any record above DEBUG, so a
  mistaken ``log.info`` still leaks nothing. ``tests/e2e/test_ops_webhook.py`` drives a real
  message through the bot and checks every INFO+ line for it.
- the bot token and the webhook secret never appear (httpx puts the token in every URL it logs).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from bot.config import LoggingConfig

# Chatty at INFO and useless to an operator: httpx logs every request (with the token in the
# URL), apscheduler every job run, aiohttp every probe.
QUIET_LOGGERS = ("httpx", "httpcore", "apscheduler", "aiohttp.access", "tornado.access")

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class UserText(str):
    """A user's message text passed as a logging argument: printed at DEBUG only."""

    __slots__ = ()


def redacted(text: str) -> str:
    return f"<text withheld: {len(text)} chars>"


class UserTextFilter(logging.Filter):
    """Above DEBUG, replaces :class:`UserText` arguments (and ``extra`` values) by their
    length."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        if isinstance(record.args, tuple):
            record.args = tuple(redacted(a) if isinstance(a, UserText) else a
                                for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: redacted(v) if isinstance(v, UserText) else v
                           for k, v in record.args.items()}
        if isinstance(record.msg, UserText):
            record.msg = redacted(record.msg)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD_ATTRS and isinstance(value, UserText):
                setattr(record, key, redacted(value))
        return True


class _Redacting(logging.Formatter):
    """Replaces secrets in the finished line (message, arguments and traceback alike)."""

    def __init__(self, base: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self._base = base
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        line = self._base.format(record)
        for secret in self._secrets:
            line = line.replace(secret, "<redacted>")
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, plus ``extra`` fields and the
    traceback (as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(config: LoggingConfig, *, secrets: Iterable[str] = (),
                  stream: TextIO | None = None) -> logging.Handler:
    """Replace the root logger's handlers with one stream handler (stderr: journald and
    ``docker logs`` collect it) following ``config``; returns that handler.

    ``secrets`` (the bot token, the webhook secret) are replaced in every line."""
    level = logging.getLevelName(config.level.upper())
    if not isinstance(level, int):
        raise ValueError(f"logging.level: unknown level {config.level!r} "
                         "(DEBUG, INFO, WARNING, ERROR)")
    base: logging.Formatter = JsonFormatter() if config.json else logging.Formatter(PLAIN_FORMAT)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_Redacting(base, secrets))
    handler.addFilter(UserTextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        # At DEBUG the operator asked for everything; otherwise these only speak up on trouble.
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG
                                         else logging.WARNING)
    return handler

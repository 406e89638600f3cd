"""Loggers named ``sheetanchor.<part>``, and logging to stdout, plain or JSON, with no secrets.

Libraries only log; the application (or ``sheetanchor`` CLI) calls :func:`configure_logging`
once at start-up so that every log line goes to stdout (incident 001: logs that went only to
a file were lost with the container).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Final

import orjson

from sheetanchor.config import ENV_LOG_FORMAT, ENV_LOG_LEVEL, env, redact
from sheetanchor.errors import ConfigError

__all__ = [
    "JsonFormatter",
    "PlainFormatter",
    "RedactingFilter",
    "configure_logging",
    "get_logger",
]

_FORMATS: Final = ("plain", "json")
_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEFAULT_LEVEL: Final = "WARNING"
_DEFAULT_FORMAT: Final = "plain"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def get_logger(part: str) -> logging.Logger:
    """Return the logger ``sheetanchor.<part>``."""
    return logging.getLogger(f"sheetanchor.{part}")


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


def _scrub(value: object, depth: int = 0) -> object:
    """Redact strings, also inside dicts and lists; render anything JSON cannot hold."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact(value)
    if depth < 8 and isinstance(value, dict):
        return {str(k): _scrub(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, depth + 1) for v in value]
    return redact(str(value))


class RedactingFilter(logging.Filter):
    """Mask passwords in a record's message, arguments and string extras.

    Installed on sheetanchor's stdout handler by :func:`configure_logging`; attach it to
    your own handlers too (``handler.addFilter(RedactingFilter())``). It renders the message
    once (``msg % args``), redacts it and stores it back with no arguments, so later
    handlers see the redacted text. It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()  # applies the lazy %s arguments
        except (TypeError, ValueError, KeyError):
            # A format string that does not match its arguments: leave the record as it is,
            # so the handler reports it through logging's own handleError (which prints
            # "--- Logging error ---") instead of raising into the caller here.
            return True
        record.msg = redact(message)
        record.args = None
        for key, value in _extras(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _utc_iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _plain(value: object) -> str:
    text = str(value)
    # Quote values with spaces so ``key=value`` pairs stay readable and splittable.
    return f'"{text}"' if any(ch.isspace() for ch in text) or not text else text


class PlainFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z WARNING sheetanchor.retry: message [key=value ...]``.

    Extras given with ``extra=`` are appended as ``key=value``; the whole line (traceback
    included) is redacted.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_utc_iso(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " [" + " ".join(f"{k}={_plain(v)}" for k, v in sorted(extras.items())) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, extras, ``exc``.

    Extras given with ``extra=`` become top-level keys (never overriding the fixed ones);
    values JSON cannot hold are rendered with ``str``. Every string is redacted.
    """

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, _scrub(value))
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = redact(self.formatStack(record.stack_info))
        return orjson.dumps(doc, default=_scrub).decode()


class _StdoutHandler(logging.StreamHandler[IO[str]]):
    """Writes to whatever ``sys.stdout`` (or ``sys.stderr``) is at the time of the call.

    Looking it up on every record (instead of once) keeps working when stdout is replaced
    later: pytest's capture, a daemon redirecting its streams, ...
    """

    _sheetanchor_handler = True

    def __init__(self) -> None:
        self.to_stderr = False
        super().__init__(sys.stdout)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr if self.to_stderr else sys.stdout

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        # StreamHandler.__init__/setStream assign it; the live sys.stdout always wins.
        del value


def _resolve_level(level: str | int | None) -> int:
    source = "level"
    if level is None:
        level, source = env(ENV_LOG_LEVEL, _DEFAULT_LEVEL) or _DEFAULT_LEVEL, ENV_LOG_LEVEL
    if isinstance(level, bool):
        raise ConfigError(f"{source} must be a level name or number, got {level!r}")
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name not in _LEVELS:
        raise ConfigError(f"{source} must be one of {', '.join(_LEVELS)}, got {level!r}")
    return logging.getLevelNamesMapping()[name]


def _resolve_format(fmt: str | None) -> str:
    source = "fmt"
    if fmt is None:
        fmt, source = env(ENV_LOG_FORMAT, _DEFAULT_FORMAT) or _DEFAULT_FORMAT, ENV_LOG_FORMAT
    name = fmt.strip().lower()
    if name not in _FORMATS:
        raise ConfigError(f"{source} must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    return name


def configure_logging(
    level: str | int | None = None, fmt: str | None = None, *, stream: str = "stdout"
) -> logging.Handler:
    """Send every log line to stdout, plain or JSON, with passwords masked.

    Installs one handler on the root logger (so application and library logs come out the
    same way) and sets the root level. Idempotent: calling it again reconfigures that one
    handler instead of adding another.

    Args:
        level: ``"DEBUG"``, ``"INFO"``, ``"WARNING"``, ``"ERROR"``, ``"CRITICAL"`` or a
            number; default ``SHEETANCHOR_LOG_LEVEL``, else ``WARNING``.
        fmt: ``"plain"`` or ``"json"``; default ``SHEETANCHOR_LOG_FORMAT``, else ``plain``.
        stream: ``"stdout"`` (the default) or ``"stderr"``, for commands whose stdout is
            data (``sheetanchor demo --json``).

    Returns:
        The installed handler (to remove it again: ``logging.getLogger().removeHandler``).

    Raises:
        ConfigError: an unknown level or format; the message names the argument or the
            environment variable it came from.

    Example::

        configure_logging()                     # from the environment
        configure_logging("INFO", fmt="json")   # explicit
    """
    if stream not in ("stdout", "stderr"):
        raise ConfigError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
    resolved_level = _resolve_level(level)
    formatter: logging.Formatter = (
        JsonFormatter() if _resolve_format(fmt) == "json" else PlainFormatter()
    )
    root = logging.getLogger()
    handler = next((h for h in root.handlers if getattr(h, "_sheetanchor_handler", False)), None)
    if handler is None:
        handler = _StdoutHandler()
        handler.addFilter(RedactingFilter())
        root.addHandler(handler)
    if isinstance(handler, _StdoutHandler):
        handler.to_stderr = stream == "stderr"
    handler.setFormatter(formatter)
    handler.setLevel(resolved_level)
    root.setLevel(resolved_level)
    return handler

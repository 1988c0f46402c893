"""One log format for every process: the CLI (and the slot processes of `iiot ingest
--processes N`, which run it), the ingest daemon's writer process, the gateway agent.

``text`` (the default) is one line per record::

    2026-12-04T21:53:08.123Z WARNING ingest-writer-0[4321] ingest_daemon.registry_cache: \
registry cache lost its database connection; retrying error="server closed the connection"

timestamp (UTC), level, process name and id, logger, the message, then the ``extra=`` fields
as ``key=value`` (quoted as JSON strings when they hold spaces, quotes or line breaks; line
breaks in the message are written ``\\n``). A traceback follows on its own lines. ``json`` is
one JSON object per line with ``ts``, ``level``, ``logger``, ``process``, ``pid``,
``message``, the extra fields and ``exc`` (the traceback). A value JSON cannot hold is written
as its ``str()``; one whose ``str()`` fails, as ``<unprintable TypeName>``: a bad value never
costs the line.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
# attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_CORE_FIELDS = ("ts", "level", "logger", "process", "pid", "message", "exc")


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The record's ``extra=`` fields, in the order they were given."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}


def _timestamp(record: logging.LogRecord) -> str:
    at = datetime.fromtimestamp(record.created, UTC)
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # a hostile __str__ must not cost the line
        return f"<unprintable {type(value).__name__}>"


def _message(record: logging.LogRecord) -> str:
    try:
        return _text(record.getMessage())
    except Exception:  # arguments that do not fit the format: show both rather than nothing
        return f"{_text(record.msg)} (arguments: {_text(record.args)})"


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return _text(value)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(_message(record))
        head = (
            f"{_timestamp(record)} {record.levelname} {record.processName}[{record.process}] "
            f"{record.name}: {message}"
        )
        fields = "".join(f" {_one_line(_text(k))}={_field(v)}" for k, v in extras(record).items())
        line = head + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _field(value: Any) -> str:
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(_plain(value))
    text = _text(value)
    if text and not any(c.isspace() or c in "\"'=\\" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "pid": record.process,
            "message": _message(record),
        }
        for key, value in extras(record).items():
            key = _text(key)
            entry[f"extra_{key}" if key in _CORE_FIELDS else key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return json.dumps(entry, ensure_ascii=False, allow_nan=False, default=_text)
        except (TypeError, ValueError, RecursionError):  # circular, or keys JSON cannot have
            safe = {k: _plain(v) for k, v in entry.items()}
            return json.dumps(safe, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a test runner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass


def configure_logging(
    level: str = "INFO",
    fmt: str = "text",
    *,
    process_name: str | None = None,
    stream: IO[str] | None = None,
    force: bool = False,
) -> None:
    """Log records at ``level`` and above to stderr (or ``stream``) in format ``fmt``.

    Like ``logging.basicConfig`` it leaves a root logger that already has handlers of someone
    else's alone (an embedding program's, pytest's), unless ``force``; calling it again
    replaces what it installed before. ``process_name`` names this process in the records."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"IIOT_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_iiot", False)]
    if not force and len(ours) < len(root.handlers):
        return
    for handler in root.handlers[:] if force else ours:
        root.removeHandler(handler)
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._iiot = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    if process_name:
        multiprocessing.current_process().name = process_name


def configure_from_environment(
    process_name: str | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """``configure_logging`` with IIOT_LOG_LEVEL and IIOT_LOG_FORMAT, for a process that reads
    no other setting (the spawned writer process, the gateway agent). A bad value raises
    ValueError naming the variable, as the settings module does for the CLI."""
    env = os.environ if environ is None else environ
    level = (env.get("IIOT_LOG_LEVEL") or "INFO").strip().upper()
    fmt = (env.get("IIOT_LOG_FORMAT") or "text").strip().lower()
    for name, value, options in (
        ("IIOT_LOG_LEVEL", level, LOG_LEVELS),
        ("IIOT_LOG_FORMAT", fmt, LOG_FORMATS),
    ):
        if value not in options:
            shown = ", ".join(options)
            raise ValueError(f"{name}={env.get(name)!r} is invalid: must be one of {shown}")
    configure_logging(level, fmt, process_name=process_name)

"""Structured logs: one JSON object per line on stdout (journald keeps them; ``jq`` reads them)."""

from __future__ import annotations

import datetime as _dt
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

import msgspec

#: Where a record keeps its JSON line once formatted.
_LINE = "_minicloud_json"
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName", _LINE}


class JsonFormatter(logging.Formatter):
    """One JSON object per record. A record is formatted once and the line kept on it: the agent's two handlers
    (stdout and the rotating file, whose size check formats it again) would otherwise format it three times."""

    def format(self, record: logging.LogRecord) -> str:
        line = record.__dict__.get(_LINE)
        if line is not None:
            return str(line)
        out: dict[str, Any] = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = msgspec.json.encode(out, enc_hook=str).decode()
        record.__dict__[_LINE] = line
        return line


def setup(level: str = "info", *, file: Path | None = None, max_bytes: int = 10 << 20, backups: int = 3) -> None:
    """JSON lines on stdout and, with ``file``, in that file too (rotated past ``max_bytes``, ``backups`` copies
    kept: ``minicloud logs`` reads it)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    handlers: list[logging.Handler] = [handler]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        rotating = logging.handlers.RotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, delay=True)
        rotating.setFormatter(JsonFormatter())
        handlers.append(rotating)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(level.upper())
    # The JSON line says nothing of the source line, thread or process a record came from, so none of it is
    # collected (the logging HOWTO's "Optimization"): finding the caller walked the stack for every record, and
    # the access log writes one per API request.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    quiet_libraries()


def quiet_libraries() -> None:
    """Libraries whose debug output would carry secrets: aiosqlite logs every SQL parameter (password and key
    hashes, encrypted secrets). They log at WARNING or above whatever the agent's level."""
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO)

"""Identifiers and timestamps, always chosen by the writer (never at apply time) so replicas stay deterministic."""

from __future__ import annotations

import base64
import datetime as _dt
import os


def new_id(prefix: str) -> str:
    """A random, URL-safe, lowercase id such as ``kp-5k2x...`` (20 base32 characters = 100 random bits)."""
    return f"{prefix}-{base64.b32encode(os.urandom(15)).decode().lower()[:20]}"


def now() -> str:
    """The current UTC time as RFC 3339 with milliseconds, e.g. ``2026-11-22T21:45:10.123Z``."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_time(epoch: float) -> str:
    """``epoch`` (seconds, as ``time.time()``) in the format of :func:`now`."""
    stamp = _dt.datetime.fromtimestamp(epoch, _dt.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))

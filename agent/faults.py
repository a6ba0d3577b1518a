"""Crash points for tests: ``MINICLOUD_FAULT=<name>`` makes the agent SIGKILL itself when it reaches ``point(name)``.

This is how the crash tests stop the agent *exactly* between two steps (after a domain is defined but before it is
started, after a domain is destroyed but before it is undefined) instead of racing a timer. Unset (always, in
production), ``point`` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("MINICLOUD_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

"""Shared helpers for CLI commands: picking the client, waiting on operations, errors."""

from __future__ import annotations

import argparse
import os
import sys

from minicloud.client import Client
from minicloud.client.remotes import load_config
from minicloud.model import Operation


class CommandError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def fail(message: str, code: int = 1) -> int:
    print(f"Error: {message}", file=sys.stderr)
    return code


def client(args: argparse.Namespace) -> Client:
    """The client for ``--socket``/``--remote``; without either, the local socket (or the default remote, if set
    and no local socket exists). ``--project`` (or ``$MINICLOUD_PROJECT``) applies to every request."""
    c = _connect(args)
    c.project = getattr(args, "project", None) or os.environ.get("MINICLOUD_PROJECT") or None
    return c


def _connect(args: argparse.Namespace) -> Client:
    if getattr(args, "remote", None):
        return Client.remote(args.remote)
    if getattr(args, "socket", None):
        return Client.local(args.socket)
    local = Client.local()
    if local.socket_path and not os.path.exists(local.socket_path):
        cfg = load_config()
        if cfg.default and cfg.default in cfg.remotes:
            return Client.for_remote(cfg.remotes[cfg.default])
    return local


def wait_operation(c: Client, op: Operation, output: str) -> Operation:
    """Wait for ``op``, showing progress on stderr when it is a terminal; fail the command if the operation fails."""
    tty = sys.stderr.isatty() and output == "table"
    last = [""]

    def show(o: Operation) -> None:
        p = o.progress
        line = f"{o.action} {o.id}: {o.state}"
        if p.total:
            line += f" [{p.done}/{p.total}]"
        if p.message:
            line += f" {p.message}"
        if line != last[0]:
            last[0] = line
            if tty:
                sys.stderr.write("\r\033[K" + line)
                sys.stderr.flush()
            else:
                print(line, file=sys.stderr)

    final = c.operations.wait(op.id, on_progress=show)
    if tty:
        sys.stderr.write("\n")
    if final.state == "failed":
        detail = final.error.detail if final.error else "unknown error"
        raise CommandError(f"operation {final.id} failed: {detail}")
    return final

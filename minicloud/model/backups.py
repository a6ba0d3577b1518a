"""Backup response types (shared by server, SDK and OpenAPI)."""

from __future__ import annotations

import msgspec


class Backup(msgspec.Struct, kw_only=True):
    """A backup file of the whole state, kept on the node that made it (``GET /v1/admin/backups/{name}`` downloads
    it from that node)."""

    name: str
    size_bytes: int
    #: When the file was written (RFC 3339).
    created_at: str
    #: The node that holds the file ("" for a backup listed from a bucket).
    node: str
    #: The bucket that holds it (listed with ``?bucket=``); "" for a file on a node.
    bucket: str = ""

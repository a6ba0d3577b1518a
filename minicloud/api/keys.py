"""Typed keys for everything the aiohttp application holds (aiohttp's ``web.AppKey``), in one place. Types named
by string (host facts, operations, cluster node) are resolved lazily to keep this module free of import cycles."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from minicloud.config import Config
from minicloud.pki import NodePKI
from minicloud.state import Store

if TYPE_CHECKING:
    from minicloud.model import Node


class HostFactsSource(Protocol):
    """This node's facts for ``GET /v1/node``: ``agent.host.HostFacts`` on a node (put there by
    ``agent.node.attach_node_services``), a stand-in in API tests. The API knows only this interface."""

    def node(self) -> Node: ...


CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
PKI = web.AppKey("pki", NodePKI)
HOST = web.AppKey("host", HostFactsSource)
OPERATIONS = web.AppKey("operations", "Operations")
CLUSTER = web.AppKey("cluster", "ClusterNode")
TLS = web.AppKey("tls", ssl.SSLContext)
#: The node's session-token signer (``minicloud.api.login.SessionSigner``).
SESSION_KEY = web.AppKey("session_key", "SessionSigner")
#: The services leader's duties (``minicloud.cluster.leader.LeaderLoops``): retention and housekeeping.
LEADER_LOOPS = web.AppKey("leader_loops", "LeaderLoops")
#: This node's backup admission (``minicloud.backups.BackupGate``): one at a time, a minimum interval.
BACKUP_GATE = web.AppKey("backup_gate", "BackupGate")

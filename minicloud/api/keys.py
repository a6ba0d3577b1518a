"""Typed keys for everything the aiohttp application holds (aiohttp's ``web.AppKey``), in one place."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from aiohttp import web

from minicloud.config import Config
from minicloud.pki import NodePKI
from minicloud.state import Store

if TYPE_CHECKING:
    pass

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
PKI = web.AppKey("pki", NodePKI)
HOST = web.AppKey("host", "HostFacts")
OPERATIONS = web.AppKey("operations", "Operations")
CLUSTER = web.AppKey("cluster", "ClusterNode")
TLS = web.AppKey("tls", ssl.SSLContext)

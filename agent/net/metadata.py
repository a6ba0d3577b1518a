"""The instance metadata service of one network on one node: EC2's paths at 169.254.169.254, inside the network's
service namespace (:mod:`agent.net.service`).

A guest asks ``http://169.254.169.254/latest/meta-data/...`` (cloud-init's EC2 datasource, curl); the answer is about
the instance whose port sent the request and nobody else: the source address names the port (``lookup``, supplied by
the network reconciler, reads the records), and the MAC the namespace's neighbour table has for that address must be
the port's MAC (anti-spoofing on the guest's tap already pins both; this is the second lock). Anything else gets 403.

Paths (any version prefix: ``latest``, ``2009-04-04`` ...): ``/<v>/meta-data/`` (index), ``instance-id``,
``hostname``, ``local-hostname``, ``local-ipv4``, ``mac``, ``public-keys/``, ``public-keys/<n>/openssh-key``, and
``/<v>/user-data`` (404 when empty, as EC2 does). ``/`` lists ``latest``.

The listening socket is created inside the namespace by a short-lived thread that enters it (``setns`` affects only
the calling thread), then handed to aiohttp on the agent's event loop: no process per network, and the server reads
through ``lookup`` what the agent already has.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from pyroute2 import AsyncIPRoute, NetlinkError

from agent.net.common import NetworkError

log = logging.getLogger(__name__)

ADDRESS = "169.254.169.254"
_CLONE_NEWNET = 0x40000000
_AF_INET = 2


@dataclass(frozen=True)
class InstanceMetadata:
    """What the service tells one port's guest."""

    instance_id: str
    hostname: str
    local_ipv4: str
    mac: str
    public_keys: tuple[str, ...] = ()
    user_data: bytes = b""


#: The port that has this source address in this network (None: none does).
Lookup = Callable[[str], Awaitable[InstanceMetadata | None]]
#: The MAC the namespace's neighbour table has for an address (None: none).
MacOf = Callable[[str], Awaitable[str | None]]


def bind_in_netns(netns_path: str | None, host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host:port`` inside ``netns_path`` (None: here). Blocking (runs a thread)."""
    result: dict[str, object] = {}

    def make() -> None:
        try:
            if netns_path is not None:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(netns_path, os.O_RDONLY)
                try:
                    if libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
                finally:
                    os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
            result["sock"] = sock
        except OSError as e:
            result["error"] = e

    # A fresh thread that ends right after: the namespace it entered dies with it, the socket stays in it.
    t = threading.Thread(target=make, name="metadata-bind", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise NetworkError(f"metadata service: cannot listen on {host}:{port} in {netns_path}: {result['error']}")
    sock = result["sock"]
    assert isinstance(sock, socket.socket)
    return sock


def neighbour_lookup(netns_path: str | None) -> MacOf:
    """A :data:`MacOf` reading the neighbour table of ``netns_path`` with netlink."""

    async def mac_of(ip: str) -> str | None:
        try:
            ipr = AsyncIPRoute(netns=netns_path, flags=0) if netns_path else AsyncIPRoute()
            await ipr.setup_endpoint()
        except (OSError, NetlinkError) as e:
            log.warning("metadata: cannot read the neighbour table of %s: %s", netns_path, e)
            return None
        try:
            result = await ipr.neigh("dump", family=_AF_INET)
            msgs = [m async for m in result] if hasattr(result, "__aiter__") else list(result)
        except NetlinkError:
            return None
        finally:
            ipr.close()
        for m in msgs:
            if m.get("dst") == ip and m.get("lladdr"):
                return str(m.get("lladdr")).lower()
        return None

    return mac_of


def _text(body: str | bytes, status: int = 200) -> web.Response:
    data = body.encode() if isinstance(body, str) else body
    return web.Response(body=data, status=status, content_type="text/plain")


def make_app(lookup: Lookup, mac_of: MacOf | None) -> web.Application:
    """The metadata HTTP application (pure of sockets: tests run it with aiohttp's test client)."""

    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip = str(peer[0]) if peer else ""
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            return _text("forbidden\n", 403)
        meta = await lookup(ip)
        if meta is None:
            return _text(f"no instance of this network has the address {ip}\n", 403)
        if mac_of is not None:
            mac = await mac_of(ip)
            if mac != meta.mac.lower():
                log.warning("metadata: %s asked from MAC %s, its port has %s; refused", ip, mac, meta.mac)
                return _text("the address and the MAC do not belong to one port\n", 403)
        parts = [p for p in request.path.split("/") if p]
        if not parts:
            return _text("latest\n")
        rest = parts[1:]
        if not rest:
            return _text("meta-data/\nuser-data\n")
        if rest == ["user-data"]:
            return _text(meta.user_data) if meta.user_data else _text("not found\n", 404)
        if rest[0] != "meta-data":
            return _text("not found\n", 404)
        item = rest[1:]
        values = {
            "instance-id": meta.instance_id,
            "hostname": meta.hostname,
            "local-hostname": meta.hostname,
            "local-ipv4": meta.local_ipv4,
            "mac": meta.mac,
        }
        if not item:
            names = sorted(values) + (["public-keys/"] if meta.public_keys else [])
            return _text("".join(f"{n}\n" for n in names))
        if len(item) == 1 and item[0] in values:
            return _text(values[item[0]])
        if item[0] == "public-keys" and meta.public_keys:
            if len(item) == 1:
                return _text("".join(f"{i}=key{i}\n" for i in range(len(meta.public_keys))))
            try:
                key = meta.public_keys[int(item[1].split("=")[0])]
            except (ValueError, IndexError):
                return _text("not found\n", 404)
            if len(item) == 2:
                return _text("openssh-key\n")
            if item[2:] == ["openssh-key"]:
                return _text(key.strip() + "\n")
        return _text("not found\n", 404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


class MetadataServer:
    """One network's metadata service on this node, listening on ``address:port`` inside ``netns_path``.
    ``start`` and ``stop`` are idempotent; a failed start leaves nothing listening."""

    def __init__(
        self,
        netns_path: str | None,
        lookup: Lookup,
        *,
        address: str = ADDRESS,
        port: int = 80,
        check_mac: bool = True,
    ) -> None:
        self.netns_path = netns_path
        self.address = address
        self.port = port
        self._app = make_app(lookup, neighbour_lookup(netns_path) if check_mac else None)
        self._runner: web.AppRunner | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        if self._runner is not None:
            return
        sock = await asyncio.to_thread(bind_in_netns, self.netns_path, self.address, self.port)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


class FakeMetadataServer:
    """A :class:`MetadataServer` that listens nowhere (the fake hypervisor's nodes); ``lookup`` stays callable."""

    def __init__(self, netns_path: str | None, lookup: Lookup, **_: object) -> None:
        self.netns_path = netns_path
        self.lookup = lookup
        self.running = False

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False

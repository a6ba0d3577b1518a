"""This node's RADOS Gateway: the S3 endpoint, one ``radosgw`` per node with Ceph.

Like the other Ceph daemons (:mod:`agent.storage.ceph`) it runs as root, daemonizes itself, outlives the agent and is
*adopted* by a new one: it counts as running when a process whose command line names this cluster's ``ceph.conf``
and ``client.rgw.<node>`` exists (the pid file under ``<ceph root>/run`` is the fast path). Everything it needs is on
its command line, so the engine's ``ceph.conf`` (rewritten by the engine) stays the engine's:

- the beast frontend with TLS only, bound to the node's cluster address (``ssl_endpoint=ADDR:PORT``), with the node's
  certificate from the cluster CA (``<data_dir>/pki/server.{crt,key}``, the agent's own HTTPS certificate);
- its own cephx key ``client.rgw.<node>`` (``mon 'allow rw' osd 'allow rwx'``), in ``<ceph root>/client.rgw.<node>.keyring``;
- the pid file and log under the Ceph root; the admin socket beside the engine's;
- ``rgw_dns_name`` when a domain is set (virtual-hosted-style ``BUCKET.s3.DOMAIN``), and then a certificate of its
  own (:func:`gateway_cert`: the node certificate's names plus ``s3.DOMAIN`` and ``*.s3.DOMAIN``, from the cluster CA)
  so that clients verifying the host name accept ``BUCKET.s3.DOMAIN``.

RGW's pools are created before its first start (:data:`POOLS`): created lazily, the first bucket, PUT and multipart
upload each took ~2 s. ``radosgw`` daemonizes before it has connected to the cluster, so :meth:`Rgw.ensure_running`
waits until the endpoint answers HTTPS.

Not part of the engine (``agent/storage/ceph.py`` is another helper's) but built on its public methods
(``ceph()``, ``ensure_pool()``, ``settings``, ``conf_path``, ``admin_keyring``); ``radosgw-admin`` is run here the same way
the engine runs ``ceph``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.process import arg, wait_gone, write_private
from agent.storage.driver import StorageError, run_tool

__all__ = ["POOLS", "Rgw", "RgwError", "RgwSettings"]

#: The default zone's pools (application ``rgw``), with their placement-group counts.
POOLS: dict[str, int] = {
    ".rgw.root": 8,
    "default.rgw.control": 8,
    "default.rgw.meta": 8,
    "default.rgw.log": 8,
    "default.rgw.otp": 8,
    "default.rgw.buckets.index": 8,
    "default.rgw.buckets.non-ec": 8,
    "default.rgw.buckets.data": 32,
}
RGW_CAPS = ("mon", "allow rw", "osd", "allow rwx")


class RgwError(Exception):
    """The gateway could not be set up or started; ``str()`` is for humans."""


async def http_status(address: str, port: int, tls: ssl.SSLContext | None = None) -> int:
    """One anonymous ``GET /`` to ``address:port`` (over TLS with ``tls``); the HTTP status (raises OSError when
    nothing answers)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port, ssl=tls), 5)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"not an HTTP answer: {line[:60]!r}")
    return int(parts[1])


@dataclass
class RgwSettings:
    node: str
    address: str  # the cluster address it binds
    port: int = 8444
    cert: Path = Path()  # PEM chain (server certificate, then the CA)
    key: Path = Path()
    dns_name: str = ""  # "s3.example.com": virtual-hosted-style addressing
    start_timeout: float = 60.0
    #: Extra ``--option=value`` settings (tests: smaller caches).
    options: tuple[tuple[str, str], ...] = ()

    @property
    def entity(self) -> str:
        return f"client.rgw.{self.node}"

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.port}"


#: Settings every gateway runs with: quota caches short enough that a quota holds across gateways within seconds,
#: the usage log on (requests and bytes per bucket), S3 bucket names as AWS checks them.
DEFAULT_OPTIONS: tuple[tuple[str, str], ...] = (
    ("rgw_bucket_quota_ttl", "5"),
    ("rgw_user_quota_bucket_sync_interval", "5"),
    ("rgw_user_quota_sync_interval", "60"),
    ("rgw_enable_usage_log", "true"),
    ("rgw_relaxed_s3_bucket_names", "false"),
    ("rgw_thread_pool_size", "128"),
)


#: Tests only: ``k=v,k=v`` RGW settings added to every gateway this agent starts (e.g. ``rgw_lc_debug_interval=10``
#: so that a lifecycle "day" lasts 10 s, or a usage log flushed every second).
OPTIONS_ENV = "MINICLOUD_RGW_OPTIONS"


def env_options() -> dict[str, str]:
    text = os.environ.get(OPTIONS_ENV, "")
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


class Rgw:
    """One node's gateway, over a :class:`agent.storage.ceph.CephEngine` (its conf and admin keyring)."""

    def __init__(self, engine: Any, settings: RgwSettings) -> None:
        self.engine = engine
        self.settings = settings
        root = Path(engine.settings.root)
        self.root = root
        self.keyring = root / f"{settings.entity}.keyring"
        self.pid_file = root / "run" / f"{settings.entity}.pid"
        self.log_file = root / "log" / f"{settings.entity}.log"
        self.data_dir = root / "rgw" / f"ceph-rgw.{settings.node}"

    # -- set-up ------------------------------------------------------------------------------------------------------
    async def ensure_pools(self) -> None:
        """RGW's pools, made up front (idempotent; a few ``ceph`` commands each)."""
        existing = await self.engine.pools()
        missing = [(name, pg) for name, pg in POOLS.items() if name not in existing]
        # at once: each is a handful of `ceph` commands (~0.5 s each on a small machine)
        await asyncio.gather(*(self.engine.ensure_pool(n, application="rgw", pg_num=pg) for n, pg in missing))

    async def ensure_key(self) -> None:
        """This gateway's cephx key, from the MONs (``get-or-create``: the same key every time)."""
        if self.keyring.exists():
            return
        out = await self.engine.ceph("auth", "get-or-create", self.settings.entity, *RGW_CAPS)
        key = out[0]["key"] if isinstance(out, list) else str(out)
        from agent.storage.ceph import keyring_text

        write_private(self.keyring, keyring_text(self.settings.entity, key))

    # -- the process -------------------------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        s = self.settings
        frontend = f"beast ssl_endpoint={_bind(s.address)}:{s.port} ssl_certificate={s.cert} ssl_private_key={s.key}"
        options = dict(DEFAULT_OPTIONS) | dict(s.options) | env_options()
        if s.dns_name:
            options["rgw_dns_name"] = s.dns_name
        socket_dir = Path(self.engine.settings.socket_dir)
        return [
            "radosgw", "--conf", str(self.engine.conf_path), "--name", s.entity, "--keyring", str(self.keyring),
            "--setuser", "root", "--setgroup", "root",
            f"--pid_file={self.pid_file}", f"--log_file={self.log_file}",
            f"--admin_socket={socket_dir}/{s.entity}.asok", f"--rgw_data={self.data_dir}",
            f"--rgw_frontends={frontend}",
            *(f"--{k}={v}" for k, v in sorted(options.items())),
        ]  # fmt: skip

    def _matches(self, pid: int) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        if not argv or Path(argv[0]).name != "radosgw":
            return False
        return arg(argv, "--conf") == str(self.engine.conf_path) and arg(argv, "--name") == self.settings.entity

    def pid(self) -> int | None:
        """The running gateway's pid, or None."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file.read_text().strip())
            if self._matches(pid):
                return pid
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and self._matches(int(entry.name)):
                return int(entry.name)
        return None

    def running_argv(self) -> list[str] | None:
        pid = self.pid()
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        return None

    async def ensure_running(self) -> bool:
        """Start the gateway unless it runs with these settings (one running with other settings — a new port,
        address or certificate path — is restarted); wait until it answers. True when it was (re)started."""
        current = self.running_argv()
        if current is not None and current == self.argv():
            return False
        if current is not None:
            await self.stop()
        self._prepare()
        await _run(self.argv(), timeout=self.settings.start_timeout)
        await self.wait_serving(self.settings.start_timeout)
        return True

    def _prepare(self) -> None:
        for d in (self.data_dir, self.log_file.parent, Path(self.engine.settings.socket_dir)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()

    async def wait_serving(self, timeout: float) -> None:
        """Until the endpoint answers an HTTPS request (any status), or RgwError naming the log."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while True:
            try:
                await self.probe()
                return
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                last = str(exc) or type(exc).__name__
            if self.pid() is None and loop.time() > deadline - timeout + 5:
                raise RgwError(f"radosgw exited after starting; see {self.log_file}")
            if loop.time() > deadline:
                raise RgwError(f"radosgw does not answer on {self.settings.url} ({last}); see {self.log_file}")
            await asyncio.sleep(0.2)

    async def probe(self) -> int:
        """One anonymous ``GET /``; the HTTP status (raises OSError when nothing answers)."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # liveness only: the clients verify against the CA
        return await http_status(self.settings.address, self.settings.port, ctx)

    async def stop(self, timeout: float = 30) -> None:
        """SIGTERM, SIGKILL after ``timeout``."""
        await self._signal(signal.SIGTERM, timeout)

    async def kill(self) -> None:
        await self._signal(signal.SIGKILL, 10)

    async def _signal(self, sig: int, timeout: float) -> None:
        pid = self.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        await wait_gone([pid], timeout)

    # -- radosgw-admin (as client.admin) ------------------------------------------------------------------------------
    async def admin(self, *args: str, timeout: float = 60) -> Any:
        """``radosgw-admin ARGS`` as ``client.admin``; its JSON output (None when it prints nothing)."""
        out = await _run(
            ["radosgw-admin", "--conf", str(self.engine.conf_path), "--name", "client.admin",
             "--keyring", str(self.engine.admin_keyring), *args],
            timeout=timeout,
        )  # fmt: skip
        text = out.strip()
        return json.loads(text) if text else None

    async def ensure_admin_user(self, uid: str = "minicloud-admin") -> tuple[str, str]:
        """The gateway user minicloud signs admin ops requests as (``users``, ``buckets``, ``usage``, ``metadata``
        capabilities; no S3 data of its own); its ``(access key, secret)``. Made once for the cluster: the keys live
        in RGW's metadata, so every node reads the same."""
        try:
            info = await self.admin("user", "info", f"--uid={uid}")
        except RgwError as exc:
            if "could not fetch user info" not in str(exc) and "no user info saved" not in str(exc):
                raise
            info = await self.admin(
                "user", "create", f"--uid={uid}", "--display-name=minicloud (admin ops)",
                "--caps=users=*;buckets=*;usage=*;metadata=*",
            )  # fmt: skip
        keys = info.get("keys") or []
        if not keys:
            info = await self.admin(
                "key", "create", f"--uid={uid}", "--key-type=s3", "--gen-access-key", "--gen-secret"
            )
            keys = info.get("keys") or []
        return str(keys[0]["access_key"]), str(keys[0]["secret_key"])


# -- the gateway's certificate ---------------------------------------------------------------------------------------
def gateway_cert(pki_dir: Path, node: str, dns_name: str) -> tuple[Path, Path]:
    """The certificate chain and key the gateway serves: the node's (``server.crt``/``.key``) without a domain; with
    ``dns_name`` (``s3.DOMAIN``), ``rgw.crt``/``rgw.key`` in ``pki_dir``: the node certificate's names plus
    ``dns_name`` and ``*.dns_name``, signed by the cluster CA (every node holds its key), made again when missing,
    when its names or issuer differ, or within the renewal window of its end."""
    import datetime as _dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from minicloud import pki

    if not dns_name:
        return pki_dir / "server.crt", pki_dir / "server.key"
    crt, key = pki_dir / "rgw.crt", pki_dir / "rgw.key"
    ca_pem = (pki_dir / "ca.crt").read_bytes()
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    server = x509.load_pem_x509_certificate((pki_dir / "server.crt").read_bytes())
    sans = list(server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    want = [*sans, *(x509.DNSName(n) for n in (dns_name, f"*.{dns_name}") if x509.DNSName(n) not in sans)]
    if crt.exists() and key.exists():
        current = x509.load_pem_x509_certificate(crt.read_bytes())
        names = set(current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        fresh = current.not_valid_after_utc - _dt.datetime.now(_dt.UTC) > pki.RENEW_BEFORE
        if names == set(want) and current.issuer == ca_cert.subject and fresh:
            return crt, key
    ca_key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    private = ec.generate_private_key(ec.SECP256R1())
    cert = pki.node_certificate(ca_cert, ca_key, private.public_key(), node, want)  # type: ignore[arg-type]
    pem_key = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pki.write_private(key, pem_key)
    pki.write_private(crt, cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    return crt, key


# -- helpers -------------------------------------------------------------------------------------------------------


async def _run(argv: list[str], *, timeout: float) -> str:
    """``argv``'s stdout; RgwError when it is missing, fails or runs past ``timeout`` (killed, as when cancelled)."""
    what = f"`{argv[0]} {' '.join(a for a in argv[1:] if not a.startswith('/'))[:120]}`"
    try:
        done = await run_tool(argv, timeout=timeout, what=what)
    except StorageError as exc:
        raise RgwError(f"{exc} (Debian package radosgw)" if "not installed" in str(exc) else str(exc)) from None
    if done.returncode != 0:
        text = (done.stderr.strip() or done.stdout.strip())[-1500:]
        raise RgwError(f"`{argv[0]}` failed (exit {done.returncode}): {text}")
    return done.stdout


def _bind(address: str) -> str:
    return f"[{address}]" if ":" in address else address

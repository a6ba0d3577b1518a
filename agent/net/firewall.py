"""nftables on a node: apply a compiled ruleset in one atomic ``nft -f`` transaction, list and delete our tables.

The rules themselves come from a pure compiler elsewhere (security groups, anti-spoofing); this module only moves text
into the kernel. ``nft -f`` applies a whole file as one transaction: either every command in it takes effect or none
does, and no packet ever sees a half-applied ruleset. :func:`replace_table_script` wraps a table body in the idiom that
replaces the table atomically whether or not it exists (create it empty, delete it, define it anew).

Our tables are named ``minicloud…`` (:data:`TABLE_PREFIX`: ``minicloud-<bridge>`` of the default network,
``bridge minicloud_sg`` and ``inet minicloud_sg`` of the security-group compiler), in any family; nothing else on
the host is touched. :meth:`NftFirewall.enable_bridge_netfilter` sets ``net.bridge.bridge-nf-call-iptables = 1`` in
the namespace (per network namespace; the stateful security-group rules live in the ``inet`` family and see bridged
IPv4 only through ``br_netfilter``).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from agent.net.common import NetworkError, NetworkPermissionError, netns_argv

NFT_BINARY = "nft"
SYSCTL_BINARY = "sysctl"
BRIDGE_NF_SYSCTL = "net.bridge.bridge-nf-call-iptables"
TABLE_PREFIX = "minicloud"
FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, order=True)
class NftTable:
    family: str
    name: str

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"nftables family {self.family!r}: use one of {', '.join(FAMILIES)}")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"nftables table name {self.name!r}: use letters, digits, '_', '.', '-'")

    def __str__(self) -> str:
        return f"{self.family} {self.name}"


def replace_table_script(table: NftTable, body: str) -> str:
    """An ``nft -f`` script that replaces ``table`` with ``body`` (its chains, sets, maps) in one transaction."""
    return f"table {table} {{}}\ndelete table {table}\ntable {table} {{\n{body.rstrip()}\n}}\n"


def delete_tables_script(tables: Iterable[NftTable]) -> str:
    """An ``nft -f`` script deleting ``tables`` in one transaction; succeeds whether or not they exist."""
    return "".join(f"table {t} {{}}\ndelete table {t}\n" for t in sorted(set(tables)))


class NftFirewall:
    """nftables in the agent's namespace or in ``netns``. Stateless: every call reads or writes the kernel."""

    def __init__(self, netns: str | None = None, *, nft: str | None = None) -> None:
        self.netns = netns
        self._nft = nft or shutil.which(NFT_BINARY) or NFT_BINARY

    async def _run(self, args: list[str], stdin: str | None, what: str, binary: str | None = None) -> str:
        argv = [*netns_argv(self.netns), binary or self._nft, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as e:
            raise NetworkError(f"{argv[0]} not found; install nftables (and util-linux for nsenter)") from e
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            msg = err.decode(errors="replace").strip()
            exc = NetworkPermissionError if "Operation not permitted" in msg else NetworkError
            raise exc(f"nftables: could not {what}: {msg}")
        return out.decode(errors="replace")

    async def apply(self, script: str) -> None:
        """Apply ``script`` as one transaction (all or nothing). Raises :class:`NetworkError` with nft's message."""
        await self._run(["-f", "-"], script, "apply the ruleset")

    async def replace_table(self, table: NftTable, body: str) -> None:
        """Atomically replace (or create) one table; see :func:`replace_table_script`."""
        await self.apply(replace_table_script(table, body))

    async def enable_bridge_netfilter(self) -> None:
        """``net.bridge.bridge-nf-call-iptables = 1`` in this namespace (the kernel's default, set explicitly): bridged
        IPv4 then also passes the ``inet``/``ip`` hooks (``br_netfilter``), where the security groups' conntrack
        rules are. Raises :class:`NetworkError` when the kernel has no ``br_netfilter``."""
        binary = shutil.which(SYSCTL_BINARY) or SYSCTL_BINARY
        await self._run(["-q", "-w", f"{BRIDGE_NF_SYSCTL}=1"], None, f"set {BRIDGE_NF_SYSCTL}", binary)

    async def list_tables(self, prefix: str = TABLE_PREFIX) -> list[NftTable]:
        """Tables whose name starts with ``prefix`` (ours by default), sorted."""
        doc = json.loads(await self._run(["-j", "list", "tables"], None, "list tables") or "{}")
        found = []
        for item in doc.get("nftables", []):
            t = item.get("table")
            if t and t.get("name", "").startswith(prefix) and t.get("family") in FAMILIES:
                found.append(NftTable(t["family"], t["name"]))
        return sorted(found)

    async def delete_tables(self, tables: Iterable[NftTable]) -> None:
        """Delete ``tables`` in one transaction. Idempotent: an absent table counts as deleted."""
        script = delete_tables_script(tables)
        if script:
            await self.apply(script)


class FakeFirewall:
    """An in-memory :class:`NftFirewall` for unit tests and the fake hypervisor: ``tables`` maps each table to the
    last script that defined it; nothing touches the host."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.tables: dict[NftTable, str] = {}
        self.scripts: list[str] = []
        self.bridge_netfilter = False

    async def apply(self, script: str) -> None:
        self.scripts.append(script)
        for line in script.splitlines():
            if line.startswith("table ") and line.endswith("{"):
                family, name = line.split()[1:3]
                self.tables[NftTable(family, name)] = script

    async def replace_table(self, table: NftTable, body: str) -> None:
        await self.apply(replace_table_script(table, body))

    async def enable_bridge_netfilter(self) -> None:
        self.bridge_netfilter = True

    async def list_tables(self, prefix: str = TABLE_PREFIX) -> list[NftTable]:
        return sorted(t for t in self.tables if t.name.startswith(prefix))

    async def delete_tables(self, tables: Iterable[NftTable]) -> None:
        for t in tables:
            self.tables.pop(t, None)

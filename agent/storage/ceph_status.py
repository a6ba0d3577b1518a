"""Ceph's JSON (``ceph status``, ``ceph osd df tree``, ``ceph mon dump``, ``ceph osd pool ls detail``) turned into
one :class:`CephStatus`: figures, and plain words saying what is wrong and what to do. Pure; golden-tested with
output captured from a real cluster (tests/unit/agent/ceph_json/)."""

from __future__ import annotations

from typing import Any

import msgspec

DISK_LIST_HINT = "run `minicloud storage disk list`"


class OsdInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    node: str  # the CRUSH host ("" for an OSD outside the CRUSH tree)
    up: bool  # its daemon runs and talks to the MONs
    in_: bool = msgspec.field(name="in")  # it holds data (not out/drained)
    used_bytes: int = 0
    size_bytes: int = 0


class MonInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # the node
    address: str  # msgr2 IP:port
    in_quorum: bool


class CephStatus(msgspec.Struct, kw_only=True):
    health: str  # HEALTH_OK | HEALTH_WARN | HEALTH_ERR
    summary: str  # plain words: what is wrong and what to do, or that all is well
    ready: bool  # the MGR reports, and every placement group of every pool is active+clean
    capacity_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    pgs: dict[str, int] = {}  # PG state → count
    osds: list[OsdInfo] = []
    mons: list[MonInfo] = []
    mgr_available: bool = False
    checks: dict[str, str] = {}  # Ceph's health check code → its message


def parse_osds(df_tree: dict[str, Any]) -> list[OsdInfo]:
    """OSDs from ``ceph osd df tree``, each with its host (stray OSDs, outside the CRUSH tree, have node "")."""
    nodes = df_tree.get("nodes", []) + df_tree.get("stray", [])
    host_of: dict[int, str] = {}
    for n in nodes:
        if n.get("type") == "host":
            for child in n.get("children", []):
                host_of[child] = n["name"]
    out = [
        OsdInfo(
            id=n["id"],
            node=host_of.get(n["id"], ""),
            up=n.get("status") == "up",
            in_=float(n.get("reweight", 0)) > 0,
            used_bytes=int(n.get("kb_used", 0)) * 1024,
            size_bytes=int(n.get("kb", 0)) * 1024,
        )
        for n in nodes
        if n.get("type") == "osd" and n.get("id", -1) >= 0
    ]
    return sorted(out, key=lambda o: o.id)


def parse_mons(mon_dump: dict[str, Any]) -> list[MonInfo]:
    quorum = set(mon_dump.get("quorum", []))
    out = []
    for m in mon_dump.get("mons", []):
        addrs = m.get("public_addrs", {}).get("addrvec", [])
        v2 = next((a["addr"] for a in addrs if a.get("type") == "v2"), None)
        out.append(
            MonInfo(name=m["name"], address=v2 or m.get("addr", "").split("/")[0], in_quorum=m["rank"] in quorum)
        )
    return out


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _osd_list(osds: list[OsdInfo]) -> str:
    by_node: dict[str, list[str]] = {}
    for o in osds:
        by_node.setdefault(o.node or "no node", []).append(f"osd.{o.id}")
    return ", ".join(f"{' '.join(names)} on node {node}" for node, names in by_node.items())


def status_from_json(
    status: dict[str, Any],
    df_tree: dict[str, Any],
    mon_dump: dict[str, Any],
    pools: list[dict[str, Any]] | None = None,
) -> CephStatus:
    health = status.get("health", {})
    checks = {code: c.get("summary", {}).get("message", "") for code, c in health.get("checks", {}).items()}
    pgmap = status.get("pgmap", {})
    pgs: dict[str, int] = {}
    for p in pgmap.get("pgs_by_state", []):
        pgs[p["state_name"]] = pgs.get(p["state_name"], 0) + int(p["count"])
    num_pgs = int(pgmap.get("num_pgs", 0))
    osds = parse_osds(df_tree)
    mons = parse_mons(mon_dump)
    mgr = bool(status.get("mgrmap", {}).get("available", False))
    pools = pools or []
    expected_pgs = sum(int(p.get("pg_num", 0)) for p in pools)

    words: list[str] = []
    handled: set[str] = set()
    out_of_quorum = [m for m in mons if not m.in_quorum]
    if out_of_quorum:
        handled.add("MON_DOWN")
        names = ", ".join(f"{m.name} at {m.address}" for m in out_of_quorum)
        words.append(
            f"{len(out_of_quorum)} of {len(mons)} monitors {'is' if len(out_of_quorum) == 1 else 'are'}"
            f" out of quorum ({names}): its daemon is not running or cannot reach the others; the agent on that"
            " node restarts it"
        )
    if not mgr:
        handled.add("MGR_DOWN")
        words.append(
            "the manager (ceph-mgr) is not running, so usage figures and placement group states are stale; the agent"
            " restarts it"
        )
    if not osds:
        handled.add("TOO_FEW_OSDS")
        words.append("there are no disks (OSDs): add one with `minicloud storage disk add`")
    down = [o for o in osds if not o.up]
    if down:
        handled |= {"OSD_DOWN", "OSD_HOST_DOWN"}
        verb = "is" if len(down) == 1 else "are"
        words.append(
            f"{len(down)} of {_plural(len(osds), 'OSD')} {verb} down ({_osd_list(down)}): "
            f"{'its daemon is' if len(down) == 1 else 'their daemons are'} not running; the agent restarts "
            f"{'it' if len(down) == 1 else 'them'}, or {DISK_LIST_HINT}"
        )
    drained = [o for o in osds if o.up and not o.in_]
    if drained:
        words.append(f"{_osd_list(drained)} {'is' if len(drained) == 1 else 'are'} out: data is moving off")

    unclean = {s: n for s, n in pgs.items() if s != "active+clean"}
    if mgr and unclean:
        handled |= {"PG_DEGRADED", "PG_AVAILABILITY", "PG_RECOVERY_FULL", "PG_BACKFILL_FULL"}
        inactive = sum(n for s, n in unclean.items() if "active" not in s.split("+"))
        degraded = sum(n for s, n in unclean.items() if {"degraded", "undersized"} & set(s.split("+")))
        if inactive:
            words.append(
                f"{_plural(inactive, 'placement group')} of {num_pgs} {'is' if inactive == 1 else 'are'} not active: "
                "I/O to part of the data waits until enough disks are back up"
            )
        if degraded:
            words.append(
                f"{degraded} of {num_pgs} placement groups have fewer copies than asked: data is served but less "
                "safe until recovery finishes (it runs by itself once the disks are up)"
            )
        rest = sum(unclean.values()) - inactive - degraded
        if rest > 0:
            words.append(f"{rest} of {num_pgs} placement groups are moving or checking data ({', '.join(unclean)})")
    if mgr and num_pgs < expected_pgs:
        words.append(f"{expected_pgs - num_pgs} placement groups of new pools are being created")

    full = [c for c in ("OSD_FULL", "OSD_BACKFILLFULL", "OSD_NEARFULL", "POOL_FULL", "POOL_NEARFULL") if c in checks]
    if full:
        handled |= set(full)
        used = int(pgmap.get("bytes_used", 0))
        total = int(pgmap.get("bytes_total", 0)) or 1
        stop = "writes are refused" if "OSD_FULL" in full or "POOL_FULL" in full else "writes stop when they are full"
        words.append(
            f"disks are nearly full ({100 * used // total} % used): {stop}; add a disk with "
            "`minicloud storage disk add` or delete volumes and snapshots"
        )
    single = sorted(p["pool_name"] for p in pools if int(p.get("size", 0)) == 1)
    if single:
        words.append(
            f"{'pool' if len(single) == 1 else 'pools'} {', '.join(single)} keep one copy: a lost disk loses data"
        )
    for code, message in sorted(checks.items()):
        if code not in handled:
            words.append(f"{message} ({code})")

    ready = (
        mgr
        and bool(mons)
        and not out_of_quorum
        and num_pgs >= expected_pgs
        and int(pgmap.get("num_pools", 0)) >= len(pools)
        and (pgs.get("active+clean", 0) == num_pgs > 0 or (num_pgs == 0 and any(o.up and o.in_ for o in osds)))
    )
    if not words:
        capacity = int(pgmap.get("bytes_total", 0))
        hosts = len({o.node for o in osds})
        words = [
            f"healthy: {_plural(len(osds), 'OSD')} on {_plural(hosts, 'node')}, {_gib(capacity)} of which "
            f"{_gib(int(pgmap.get('bytes_used', 0)))} used; all {num_pgs} placement groups active+clean"
            if ready
            else "starting: placement groups are being set up"
        ]
    summary = "; ".join(words)
    return CephStatus(
        health=health.get("status", "HEALTH_ERR"),
        summary=summary[0].upper() + summary[1:] + ".",
        ready=ready,
        capacity_bytes=int(pgmap.get("bytes_total", 0)),
        used_bytes=int(pgmap.get("bytes_used", 0)),
        available_bytes=int(pgmap.get("bytes_avail", 0)),
        pgs=pgs,
        osds=osds,
        mons=mons,
        mgr_available=mgr,
        checks=checks,
    )


def lost_nodes_words(st: CephStatus, lost: set[str], down_out_interval: int) -> str:
    """What a lost node (``lost``: the nodes the cluster says are offline or removed) means for Ceph, in plain words:
    its MON is out of quorum (do the others keep it?), its OSDs are down and when their data is copied elsewhere.
    "" when no MON or OSD of Ceph is on a lost node. Pure."""
    words = []
    for node in sorted(lost):
        mon = next((m for m in st.mons if m.name == node), None)
        osds = [o for o in st.osds if o.node == node]
        if mon is None and not osds:
            continue
        parts = []
        if mon is not None and not mon.in_quorum:
            others = [m for m in st.mons if m.name != node]
            kept = sum(1 for m in others if m.in_quorum)
            if kept > len(st.mons) // 2:
                parts.append(f"its monitor is out of quorum ({kept} of {len(st.mons)} monitors keep the quorum)")
            else:
                parts.append(
                    f"its monitor is out of quorum and only {kept} of {len(st.mons)} monitors are left: no quorum, "
                    "bring a monitor node back"
                )
        down = [o for o in osds if not o.up]
        if down:
            still_in = [o for o in down if o.in_]
            names = " ".join(f"osd.{o.id}" for o in down)
            if still_in:
                parts.append(
                    f"{names} {'is' if len(down) == 1 else 'are'} down; Ceph marks {'it' if len(down) == 1 else 'them'}"
                    f" out {down_out_interval} s after {'it' if len(down) == 1 else 'they'} went down and copies the "
                    "data to the other nodes"
                )
            else:
                one = len(down) == 1
                parts.append(
                    f"{names} {'is' if one else 'are'} down and out: {'its' if one else 'their'} data is copied elsewhere"
                )
        if parts:
            words.append(
                f"node {node} is lost (offline): " + "; ".join(parts) + f"; when it is gone for good, remove it "
                f"(`minicloud cluster remove {node}`), or start it again"
            )
    return "; ".join(words)

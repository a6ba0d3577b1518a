"""``minicloud cluster enable|show|list|add|remove|promote|settings|set|unset`` and ``minicloud join TOKEN``."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.cluster.kinds import CLUSTER_SETTING, NODE, SETTINGS
from minicloud.model import ClusterInfo, JoinTokenIssued

#: ``cluster list``/``show``: the node kind's declared columns (rows are ``ClusterMember``s).
COLUMNS = [col(c.header, c.path) for c in NODE.columns]
#: ``cluster settings``: the setting kind's declared columns.
SETTING_COLUMNS = [col(c.header, c.path) for c in CLUSTER_SETTING.columns]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="grow from one node to a cluster; members, leader")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("enable", help="turn this single node into a cluster (etcd); keeps every record")
    v.add_argument("--zone", default="", help="this node's failure domain (label zone=)")
    v.set_defaults(func=enable)
    verbs.add_parser(
        "recover", help="after permanent quorum loss, continue as a one-member cluster from this node's data"
    ).set_defaults(func=recover)
    verbs.add_parser("show", help="the cluster: leader, quorum and members").set_defaults(func=show)
    verbs.add_parser("list", help="the members with role and liveness").set_defaults(func=list_)
    v = verbs.add_parser("add", help="print a one-time token for NODE to join with `minicloud join`")
    v.add_argument("node")
    v.add_argument("--role", choices=["auto", "voter", "learner"], default="auto", help="default: voter up to 3")
    v.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="token lifetime (default 3600)")
    v.add_argument("--zone", default="", help="the node's failure domain (label zone=)")
    v.set_defaults(func=add)
    v = verbs.add_parser("remove", help="remove a node (a dead one, typically) from the cluster")
    v.add_argument("node")
    v.set_defaults(func=remove)
    v = verbs.add_parser("promote", help="make a learner a voting member")
    v.add_argument("node")
    v.set_defaults(func=promote)

    verbs.add_parser(
        "settings", help="cluster-wide settings: the cluster's value, or (never set) this node's configuration's"
    ).set_defaults(func=settings)
    v = verbs.add_parser("set", help="set a cluster-wide setting: every node applies it (admin)")
    v.add_argument("name", help="the setting: " + ", ".join(sorted(SETTINGS)))
    v.add_argument("value", help="scheduler-weigher: spread or pack")
    v.set_defaults(func=set_)
    v = verbs.add_parser("unset", help="unset a cluster-wide setting: each node uses its configuration file's again")
    v.add_argument("name", help="the setting: " + ", ".join(sorted(SETTINGS)))
    v.set_defaults(func=unset)

    p = sub.add_parser("join", help="join this node to a cluster with a token from `minicloud cluster add`")
    p.add_argument("token")
    p.set_defaults(func=join)


def _show(info: ClusterInfo, output: str) -> None:
    if output != "table":
        emit(info, output)
        return
    if not info.enabled:
        print(f"Node {info.node} runs alone (single-node store). Start a cluster with `minicloud cluster enable`.")
        return
    print(f"node:    {info.node}")
    print(f"leader:  {info.leader or '(none)'}")
    print(f"quorum:  {'yes' if info.quorum else 'NO: writes are refused on this node'}")
    for s in info.storage:
        alarms = f", ALARM {' '.join(s.alarms)}" if s.alarms else ""
        print(
            f"etcd {s.member}: {_size(s.db_size_bytes)} of {_size(s.quota_bytes)} ({s.used_percent:g} %), "
            f"{_size(s.db_in_use_bytes)} in use{alarms}"
        )
    for s in info.storage:
        if s.warning:
            print(f"WARNING: {s.warning}")
    print()
    emit(info.members, "table", COLUMNS)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


def enable(args: argparse.Namespace) -> int:
    _show(client(args).call("POST", "/v1/cluster/enable", ClusterInfo, json={"zone": args.zone}), args.output)
    return 0


def recover(args: argparse.Namespace) -> int:
    _show(client(args).call("POST", "/v1/cluster/recover", ClusterInfo), args.output)
    return 0


def show(args: argparse.Namespace) -> int:
    _show(client(args).call("GET", "/v1/cluster", ClusterInfo), args.output)
    return 0


def list_(args: argparse.Namespace) -> int:
    emit(client(args).call("GET", "/v1/cluster", ClusterInfo).members, args.output, COLUMNS)
    return 0


def add(args: argparse.Namespace) -> int:
    issued = client(args).call(
        "POST",
        "/v1/cluster/tokens",
        JoinTokenIssued,
        json={"node": args.node, "role": args.role, "ttl": args.ttl, "zone": args.zone},
    )
    if args.output != "table":
        emit(issued, args.output)
        return 0
    print(f"Join token for {issued.node} (one use, valid until {issued.expires_at}). On {issued.node}, as root, run:")
    print(f"  minicloud join {issued.token}")
    return 0


def remove(args: argparse.Namespace) -> int:
    client(args).call("DELETE", f"/v1/cluster/members/{args.node}")
    if args.output == "table":
        print(f"Removed {args.node} from the cluster")
    return 0


def promote(args: argparse.Namespace) -> int:
    client(args).call("POST", f"/v1/cluster/members/{args.node}/promote")
    if args.output == "table":
        print(f"Promoted {args.node} to voter")
    return 0


def settings(args: argparse.Namespace) -> int:
    emit(client(args).cluster_settings.list(), args.output, SETTING_COLUMNS)
    return 0


def set_(args: argparse.Namespace) -> int:
    shown = client(args).cluster_settings.set(args.name, args.value)
    if args.output == "table":
        print(f"{shown.name} = {shown.value} on every node of the cluster")
    else:
        emit(shown, args.output)
    return 0


def unset(args: argparse.Namespace) -> int:
    c = client(args)
    c.cluster_settings.unset(args.name)
    if args.output == "table":
        shown = c.cluster_settings.get(args.name)
        print(f"{shown.name} unset: each node uses its {shown.config_key} ({shown.value} on this one)")
    return 0


def join(args: argparse.Namespace) -> int:
    info = client(args).call("POST", "/v1/cluster/join", ClusterInfo, json={"token": args.token})
    if args.output == "table":
        print(f"Joined the cluster as {info.node}; leader: {info.leader or '(electing)'}")
    else:
        emit(info, args.output)
    return 0

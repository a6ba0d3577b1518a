"""``minicloud instance create|list|show|start|stop|reboot|resize|console|delete``: virtual machines. ``show`` and the
list's columns come from the kind's declaration (:data:`minicloud.compute.kinds.INSTANCE`); ``list`` shows one
address per instance line, ``delete`` can wait for the node to finish."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicloud.cli import generic, migrate
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import col, emit
from minicloud.client import Client
from minicloud.compute.kinds import INSTANCE
from minicloud.model.compute import Instance

COLUMNS = [col(c.header, c.path) for c in INSTANCE.columns]


def _wait_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--wait", action="store_true", help=f"wait until the instance {what}")
    p.add_argument("--timeout", type=float, default=600, help="give up waiting after this many seconds (default 600)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("instance", help="virtual machines")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create an instance from an image (or boot it from a volume)")
    v.add_argument("name")
    root = v.add_mutually_exclusive_group(required=True)
    root.add_argument("--image", help="image name or id (`minicloud image list`)")
    root.add_argument(
        "--boot-volume",
        metavar="VOLUME",
        help="boot from this volume (available, unattached): it is the root disk and outlives the instance",
    )
    v.add_argument(
        "--pool",
        help="storage pool of the root disk (`minicloud pool list`); default: the image's Ceph pool, else local",
    )
    v.add_argument("--type", required=True, help="instance type (`minicloud type list`), e.g. m1.tiny")
    v.add_argument("--keypair", help="SSH key pair to put into the guest (`minicloud keypair list`)")
    v.add_argument("--user-data", metavar="FILE", help="cloud-init user-data: a #! script or #cloud-config")
    v.add_argument("--disk-size", type=int, metavar="GIB", help="root disk size (default: the type's)")
    v.add_argument("--stopped", action="store_true", help="build it but do not start it")
    v.add_argument(
        "--nic",
        action="append",
        type=parse_nic,
        metavar="subnet=S[,ip=A][,security-groups=a+b]",
        help="a NIC (repeat for several, in order): on subnet S, or network=N (its first subnet with room); "
        "ip= a fixed address; security-groups= names joined by + (default: the project's default group). "
        "Without --nic: the node's default network",
    )
    v.add_argument("--zone", help="only on nodes of this zone (`minicloud node list`)")
    v.add_argument("--node", help="only on this node (cluster administrators)")
    v.add_argument(
        "--server-group",
        metavar="GROUP",
        help="join this server group: the scheduler keeps its members apart or together (`minicloud server-group list`)",
    )
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    _wait_flag(v, "is running (or stopped with --stopped), failing if it ends in error")
    v.set_defaults(func=create)
    v = verbs.add_parser("list", help="list instances")
    v.add_argument("--label", metavar="KEY=VALUE[,...]", help="only those with these labels")
    v.add_argument("--name", help="only the one with this name")
    v.set_defaults(func=list_)
    generic.add_verbs(verbs, INSTANCE, lambda c: c.instances, which=("show",))
    v = verbs.add_parser("start", help="power an instance on")
    v.add_argument("name")
    _wait_flag(v, "is running")
    v.set_defaults(func=start)
    v = verbs.add_parser("stop", help="shut an instance down (ACPI; powered off after compute.stop_timeout)")
    v.add_argument("name")
    v.add_argument("--force", action="store_true", help="power off at once")
    _wait_flag(v, "is stopped")
    v.set_defaults(func=stop)
    v = verbs.add_parser("reboot", help="reboot an instance (ACPI; --force resets it)")
    v.add_argument("name")
    v.add_argument("--force", action="store_true", help="hard reset")
    v.set_defaults(func=reboot)
    v = verbs.add_parser("resize", help="change the type of a stopped instance")
    v.add_argument("name")
    v.add_argument("--type", required=True)
    v.set_defaults(func=resize)
    v = verbs.add_parser("nic", help="add or remove an instance's NICs (hot-plugged while it runs)")
    nic = v.add_subparsers(dest="nic_verb", metavar="<add|remove>", required=True)
    w = nic.add_parser("add", help="give an instance another NIC")
    w.add_argument("name")
    w.add_argument("--subnet", help="the subnet (name or id)")
    w.add_argument("--network", help="the network (its first subnet with room)")
    w.add_argument("--ip", help="a fixed address (default: the lowest free one)")
    w.add_argument("--security-group", action="append", dest="security_groups", metavar="GROUP",
                   help="a security group (repeat; default: the project's default group)")  # fmt: skip
    w.set_defaults(func=nic_add)
    w = nic.add_parser("remove", help="unplug and delete a NIC")
    w.add_argument("name")
    w.add_argument("nic", help="the NIC's port id, MAC or address (`minicloud instance show`)")
    w.set_defaults(func=nic_remove)
    v = verbs.add_parser("console", help="print the serial console log")
    v.add_argument("name")
    v.add_argument("--follow", "-f", action="store_true", help="keep printing what the guest writes (Ctrl-C stops)")
    v.add_argument("--tail", type=int, default=0, metavar="BYTES", help="only the last BYTES of the log")
    v.set_defaults(func=console)
    v = verbs.add_parser("delete", help="delete an instance and its disk")
    v.add_argument("name")
    _wait_flag(v, "is gone")
    v.set_defaults(func=delete)
    migrate.register(verbs)


_NIC_KEYS = {"subnet": "subnet", "network": "network", "ip": "ip", "security-groups": "security_groups"}


def parse_nic(text: str) -> dict[str, object]:
    """``subnet=S[,ip=A][,security-groups=a+b]`` or ``network=N[,…]`` as the API's NIC object."""
    nic: dict[str, object] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _NIC_KEYS or not value.strip():
            raise argparse.ArgumentTypeError(
                f"'{part}' is not KEY=VALUE with KEY one of {', '.join(_NIC_KEYS)} "
                "(e.g. --nic subnet=web,ip=10.0.1.5,security-groups=web+ssh)"
            )
        field = _NIC_KEYS[key]
        if field in nic:
            raise argparse.ArgumentTypeError(f"'{key}' is given twice in --nic {text}")
        nic[field] = [g for g in value.strip().split("+") if g] if field == "security_groups" else value.strip()
    if ("subnet" in nic) == ("network" in nic):
        raise argparse.ArgumentTypeError(f"--nic {text}: give either subnet= or network=")
    return nic


def _wait(c: Client, name: str, args: argparse.Namespace, want: str | None) -> Instance | None:
    """Wait for the instance to settle (``want``: running/stopped; None: gone), showing state changes on stderr."""
    tty = sys.stderr.isatty() and args.output == "table"

    def show(i: Instance) -> None:
        line = f"instance {i.name}: {i.status.state}" + (f" ({i.status.reason})" if i.status.reason else "")
        print(line, file=sys.stderr) if not tty else sys.stderr.write("\r\033[K" + line)

    def until(i: Instance) -> bool:
        return want is not None and (i.status.state == "error" or i.status.state == want)

    try:
        inst = c.instances.wait(name, until=until, timeout=args.timeout, on_change=show)
    except TimeoutError as exc:
        raise CommandError(str(exc)) from None
    if tty:
        sys.stderr.write("\n")
    if inst is not None and inst.status.state == "error":
        raise CommandError(f"instance {inst.name} failed: {inst.status.reason}")
    return inst


def create(args: argparse.Namespace) -> int:
    user_data = None
    if args.user_data:
        try:
            user_data = Path(args.user_data).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {args.user_data}: {getattr(exc, 'strerror', None) or exc}") from None
    c = client(args)
    inst = c.instances.create(
        name=args.name,
        image=args.image,
        boot_volume=args.boot_volume,
        pool=args.pool,
        type=args.type,
        keypair=args.keypair,
        user_data=user_data,
        disk_gib=args.disk_size,
        start=not args.stopped,
        nics=args.nic,
        zone=args.zone,
        node=args.node,
        server_group=args.server_group,
        description=args.description,
        labels=parse_labels(args.label),
    )
    if args.wait:
        inst = _wait(c, inst.id, args, "stopped" if args.stopped else "running") or inst
    emit(inst, args.output)
    return 0


def list_(args: argparse.Namespace) -> int:
    items = client(args).instances.list(label=args.label, name=args.name)
    if args.output == "table":
        for i in items:  # one line per address in the table: "10.0.0.5" rather than a JSON list
            i.status.addresses = ", ".join(a.ip or "-" for a in i.status.addresses)  # type: ignore[assignment]
    emit(items, args.output, COLUMNS)
    return 0


def start(args: argparse.Namespace) -> int:
    c = client(args)
    inst = c.instances.start(args.name)
    if args.wait:
        inst = _wait(c, inst.id, args, "running") or inst
    emit(inst, args.output)
    return 0


def stop(args: argparse.Namespace) -> int:
    c = client(args)
    inst = c.instances.stop(args.name, force=args.force)
    if args.wait:
        inst = _wait(c, inst.id, args, "stopped") or inst
    emit(inst, args.output)
    return 0


def reboot(args: argparse.Namespace) -> int:
    emit(client(args).instances.reboot(args.name, force=args.force), args.output)
    return 0


def resize(args: argparse.Namespace) -> int:
    emit(client(args).instances.resize(args.name, type=args.type), args.output)
    return 0


def nic_add(args: argparse.Namespace) -> int:
    inst = client(args).instances.add_nic(
        args.name, subnet=args.subnet, network=args.network, ip=args.ip, security_groups=args.security_groups
    )
    emit(inst, args.output)
    return 0


def nic_remove(args: argparse.Namespace) -> int:
    emit(client(args).instances.remove_nic(args.name, args.nic), args.output)
    return 0


def console(args: argparse.Namespace) -> int:
    c = client(args)
    out = sys.stdout.buffer
    if not args.follow:
        out.write(c.instances.console(args.name, tail=args.tail))
        out.flush()
        return 0
    try:
        for chunk in c.instances.follow_console(args.name, tail=args.tail):
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        pass
    return 0


def delete(args: argparse.Namespace) -> int:
    c = client(args)
    inst = c.instances.delete(args.name)
    if args.wait and inst is not None:
        _wait(c, inst.id, args, None)
    if args.output == "table":
        print(f"Deleted instance {args.name}" if args.wait else f"Deleting instance {args.name}")
    return 0

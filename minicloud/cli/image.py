"""``minicloud image import|list|show|delete``: bootable images in the node's image store. ``image import NAME PATH``
uploads PATH from this machine over a remote, or lets the node read it through its own socket (:func:`uploads`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client, wait_operation
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.client import Client
from minicloud.client.compute import Progress
from minicloud.compute.kinds import IMAGE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(IMAGE.noun, help="images instances boot from")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser(
        "import",
        help="import a disk image (a file here or on the node, or an http(s) URL) or a kernel + initrd",
        description="Where PATH is read depends on whom the command talks to: over a remote (HTTPS) the file on "
        "this machine is uploaded (its SHA-256 computed first, progress shown); through the node's own Unix socket "
        "the node reads PATH itself (it must be under compute.image_dirs or <data_dir>/import). --upload and "
        "--node-path choose explicitly. A URL is downloaded by the node as an operation, shown with its progress "
        "(internal addresses only if the node's compute.image_url_allow lists them). The format is what qemu-img "
        "finds. Examples: `minicloud image import debian ./debian.qcow2`, "
        "`minicloud image import guest --kernel out/vmlinuz --initrd out/initrd.img`.",
    )
    v.add_argument("name")
    v.add_argument(
        "source", nargs="?", metavar="PATH|URL", help="a qcow2/raw disk file (here or on the node, see above), or a URL"
    )
    where = v.add_mutually_exclusive_group()
    where.add_argument(
        "--upload", action="store_true", help="PATH is on this machine: upload it (the default over a remote)"
    )
    where.add_argument(
        "--node-path",
        action="store_true",
        help="PATH is on the node: the node reads it (the default through the node's Unix socket)",
    )
    v.add_argument("--format", choices=["qcow2", "raw"], help="fail unless the disk is in this format")
    v.add_argument("--sha256", metavar="HEX", help="fail (keeping nothing) unless the disk has this SHA-256")
    v.add_argument("--kernel", metavar="FILE", help="direct-kernel boot: the kernel (vmlinuz)")
    v.add_argument("--initrd", metavar="FILE", help="direct-kernel boot: the initramfs")
    v.add_argument("--cmdline", default="", help="direct-kernel boot: the kernel command line")
    v.add_argument("--firmware", choices=["bios", "uefi"], default="bios", help="disk images: how they boot")
    v.add_argument(
        "--pool",
        help="disk images: the storage pool to copy the disk into (`minicloud pool list`; default: the default pool)",
    )
    v.add_argument("--os-distro", default="", help="e.g. debian")
    v.add_argument("--os-version", default="", help="e.g. 12")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=import_)
    generic.add_verbs(verbs, IMAGE, lambda c: c.images, which=("list", "show"))
    v = verbs.add_parser("delete", help="delete an image (refused while instances use it)")
    v.add_argument("name")
    v.set_defaults(func=delete)


def _abs(path: str | None) -> str | None:
    """Paths are read by the agent, so make relative ones absolute from where the command runs."""
    return os.path.abspath(path) if path else None


def uploads(args: argparse.Namespace, c: Client) -> bool:
    """Whether ``image import NAME PATH`` uploads PATH from this machine: with ``--upload``, or by default when the
    client talks to a remote (HTTPS) — the node's own Unix socket is on the node, so there PATH is read by the node,
    as it always was, unless ``--upload`` says otherwise. URLs and ``--kernel`` are never uploaded."""
    source = args.source
    if not source or source.startswith(("http://", "https://")) or args.kernel or args.initrd:
        return False
    if args.upload or args.node_path:
        return bool(args.upload)
    return c.socket_path is None


def import_(args: argparse.Namespace) -> int:
    source = args.source
    url = source if source and source.startswith(("http://", "https://")) else None
    if (args.upload or args.node_path) and (url is not None or not source):
        raise CommandError("--upload and --node-path go with a PATH (not a URL or --kernel)")
    c = client(args)
    if uploads(args, c):
        return upload(args, c)
    fields = {
        "path": _abs(source) if source and url is None else None,
        "format": args.format,
        "sha256": args.sha256,
        "kernel": _abs(args.kernel),
        "initrd": _abs(args.initrd),
        "cmdline": args.cmdline,
        "firmware": args.firmware,
        "pool": args.pool,
        "os_distro": args.os_distro,
        "os_version": args.os_version,
        "description": args.description,
        "labels": parse_labels(args.label),
    }
    if url is None:
        emit(c.images.create(name=args.name, **fields), args.output)
        return 0
    if args.kernel or args.initrd:
        raise CommandError("give either a URL (a disk image) or --kernel/--initrd, not both")
    del fields["path"], fields["kernel"], fields["initrd"], fields["cmdline"]
    final = wait_operation(c, c.images.import_url(name=args.name, url=url, **fields), args.output)
    emit(c.images.get((final.result or {})["image_id"]), args.output)
    return 0


def upload(args: argparse.Namespace, c: Client) -> int:
    path = args.source
    if not os.path.isfile(path):
        hint = "" if args.upload else "; to import a file on the node, add --node-path"
        raise CommandError(f"there is no file '{path}' on this machine to upload{hint}")
    if any("," in value for value in parse_labels(args.label).values()):
        raise CommandError(
            "label values of an upload may not contain ','; set such labels afterwards with PATCH /v1/images/NAME"
        )
    show = _progress(args.name) if sys.stderr.isatty() and args.output == "table" else None
    try:
        image = c.images.upload(
            args.name,
            path,
            sha256=args.sha256,
            format=args.format,
            firmware=args.firmware,
            pool=args.pool,
            os_distro=args.os_distro or None,
            os_version=args.os_version or None,
            description=args.description or None,
            labels=parse_labels(args.label),
            progress=show,
        )
    finally:
        if show is not None:
            sys.stderr.write("\n")
    emit(image, args.output)
    return 0


def _progress(name: str) -> Progress:
    """One status line on stderr, rewritten in place at most ten times a second: phase, percent, MiB, MB/s."""
    state = {"phase": "", "start": 0.0, "shown": 0.0}

    def show(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != state["phase"]:
            state.update(phase=phase, start=now, shown=0.0)
        elif done < total and now - state["shown"] < 0.1:
            return
        state["shown"] = now
        elapsed = max(now - state["start"], 1e-6)
        percent = 100 * done / total if total else 100
        what = "checksumming" if phase == "hashing" else "uploading"
        line = (
            f"{what} {name}: {percent:3.0f}% {done / (1 << 20):.1f}/{total / (1 << 20):.1f} MiB "
            f"{done / elapsed / 1e6:.1f} MB/s"
        )
        if phase == "uploading" and done >= total:
            line += ", the node is checking it"
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()

    return show


def delete(args: argparse.Namespace) -> int:
    client(args).images.delete(args.name)
    if args.output == "table":
        print(f"Deleted image {args.name}")
    return 0

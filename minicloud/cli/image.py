"""``minicloud image import|list|show|delete``: bootable images in the node's image store."""

from __future__ import annotations

import argparse
import os

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client, wait_operation
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.compute.kinds import IMAGE


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(IMAGE.noun, help="images instances boot from")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser(
        "import",
        help="import a disk image (PATH on the node, or an http(s) URL) or a kernel + initrd",
        description="Files are read on the node (they must be under its compute.image_dirs or <data_dir>/import); "
        "a URL is downloaded by the node as an operation, shown with its progress (internal addresses only if the "
        "node's compute.image_url_allow lists them); the format is what qemu-img finds. Examples: "
        "`minicloud image import debian ./debian.qcow2`, "
        "`minicloud image import guest --kernel out/vmlinuz --initrd out/initrd.img`.",
    )
    v.add_argument("name")
    v.add_argument("source", nargs="?", metavar="PATH|URL", help="a qcow2/raw disk file on the node, or a URL")
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


def import_(args: argparse.Namespace) -> int:
    source = args.source
    url = source if source and source.startswith(("http://", "https://")) else None
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
    c = client(args)
    if url is None:
        emit(c.images.create(name=args.name, **fields), args.output)
        return 0
    if args.kernel or args.initrd:
        raise CommandError("give either a URL (a disk image) or --kernel/--initrd, not both")
    del fields["path"], fields["kernel"], fields["initrd"], fields["cmdline"]
    final = wait_operation(c, c.images.import_url(name=args.name, url=url, **fields), args.output)
    emit(c.images.get((final.result or {})["image_id"]), args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).images.delete(args.name)
    if args.output == "table":
        print(f"Deleted image {args.name}")
    return 0

"""``minicloud keypair import|list|show|delete``: SSH public keys for guests."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.output import emit
from minicloud.compute.kinds import KEYPAIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keypair", help="SSH key pairs injected into instances")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("import", help="import an OpenSSH public key from FILE ('-' for stdin)")
    v.add_argument("name")
    v.add_argument("file")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=import_)
    generic.add_verbs(verbs, KEYPAIR, lambda c: c.keypairs)


def parse_labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--label {item!r} must be KEY=VALUE")
        labels[key] = value
    return labels


def import_(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}") from None
    kp = client(args).keypairs.create(
        name=args.name, public_key=text, description=args.description, labels=parse_labels(args.label)
    )
    emit(kp, args.output)
    return 0

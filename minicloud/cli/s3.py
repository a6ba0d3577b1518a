"""``minicloud s3 endpoint``: the S3 endpoint's URL, CA bundle and ready-made ``aws``/rclone settings."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("s3", help="the S3 endpoint (object storage)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("endpoint", help="the endpoint's URL, CA bundle and client settings for an access key")
    v.add_argument("--key", default="", metavar="ACCESS_KEY_ID", help="put this access key id in the settings")
    v.add_argument("--ca-out", metavar="FILE", help="write the CA bundle (PEM) to FILE")
    v.set_defaults(func=endpoint)


def endpoint(args: argparse.Namespace) -> int:
    ep = client(args).s3.endpoint(key=args.key or None)
    if args.ca_out:
        with open(args.ca_out, "w") as f:
            f.write(ep.ca_bundle)
    if args.output != "table":
        emit(ep, args.output)
        return 0
    print(f"URL:        {ep.url}")
    if len(ep.urls) > 1:
        print(f"All nodes:  {', '.join(ep.urls)}")
    print(f"CA bundle:  {args.ca_out or ep.ca_path} ({ep.ca_fingerprint})")
    if ep.virtual_host:
        print(f"Virtual hosts: BUCKET.{ep.virtual_host}")
    if ep.tenant:
        print(f"Tenant:     {ep.tenant} (public URLs: {ep.url}/{ep.tenant}:BUCKET/KEY)")
    print("\n" + ep.aws_config + "\n# rclone.conf\n" + ep.rclone_config, end="")
    return 0

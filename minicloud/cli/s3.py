"""``minicloud s3 endpoint``: the S3 endpoint's URL, CA bundle and ready-made ``aws``/rclone settings;
``minicloud s3 usage``: the project's quota, usage and metering; ``minicloud s3 quota set``: its quota (admins)."""

from __future__ import annotations

import argparse

import msgspec

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("s3", help="the S3 endpoint (object storage)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("endpoint", help="the endpoint's URL, CA bundle and client settings for an access key")
    v.add_argument("--key", default="", metavar="ACCESS_KEY_ID", help="put this access key id in the settings")
    v.add_argument("--ca-out", metavar="FILE", help="write the CA bundle (PEM) to FILE")
    v.set_defaults(func=endpoint)
    v = verbs.add_parser("usage", help="the project's S3 quota, and what its buckets hold and served")
    v.set_defaults(func=usage)
    q = verbs.add_parser("quota", help="the project's S3 quota (administrators)")
    qverbs = q.add_subparsers(dest="qverb", metavar="<verb>", required=True)
    v = qverbs.add_parser("set", help="set the project's quota on everything its buckets hold (--project P)")
    v.add_argument("--max-bytes", type=int, metavar="N", help="bytes (0: unlimited)")
    v.add_argument("--max-objects", type=int, metavar="N", help="objects (0: unlimited)")
    v.add_argument("--default", action="store_true", help="back to the configuration's [objects] quota")
    v.set_defaults(func=quota_set)


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


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _show_usage(u, fmt: str) -> None:  # type: ignore[no-untyped-def]
    if fmt != "table":
        emit(u, fmt)
        return
    quota = ", ".join(
        part for part in (f"{_size(u.quota_bytes)}" if u.quota_bytes else "", f"{u.quota_objects} objects"
                          if u.quota_objects else "") if part
    ) or "unlimited"  # fmt: skip
    print(f"Project:   {u.project}" + (f" (tenant {u.tenant})" if u.tenant else ""))
    print(f"Quota:     {quota} (from the {'project' if u.quota_source == 'project' else 'configuration'})")
    print(f"Buckets:   {u.buckets}, {u.objects} objects, {_size(u.size_bytes)}")
    print(f"Metering:  {u.requests} requests, {_size(u.bytes_out)} out, {_size(u.bytes_in)} in")
    if u.by_bucket:
        print()
        emit([msgspec.to_builtins(b) for b in u.by_bucket], "table", columns=_COLUMNS)


def usage(args: argparse.Namespace) -> int:
    _show_usage(client(args).s3.usage(), args.output)
    return 0


def quota_set(args: argparse.Namespace) -> int:
    if args.default and (args.max_bytes is not None or args.max_objects is not None):
        raise CommandError("--default goes alone (it resets both)")
    if args.default:
        u = client(args).s3.set_quota(quota_bytes=None, quota_objects=None)
    elif args.max_bytes is None and args.max_objects is None:
        raise CommandError("give --max-bytes, --max-objects or --default")
    else:
        fields = {k: v for k, v in (("quota_bytes", args.max_bytes), ("quota_objects", args.max_objects))
                  if v is not None}  # fmt: skip
        u = client(args).s3.set_quota(**fields)
    _show_usage(u, args.output)
    return 0


_COLUMNS = [
    ("bucket", lambda b: b["name"]),
    ("objects", lambda b: b["objects"]),
    ("bytes", lambda b: b["size_bytes"]),
    ("requests", lambda b: b["requests"]),
    ("bytes out", lambda b: b["bytes_out"]),
    ("bytes in", lambda b: b["bytes_in"]),
]

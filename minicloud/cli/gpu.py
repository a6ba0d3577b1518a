"""``minicloud gpu list|show``: the GPUs every node found (cluster administrators)."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.gpu.kinds import GPU


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu", help="GPUs of the cluster's nodes: model, driver, passthrough capability, holder")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    generic.add_verbs(verbs, GPU, lambda c: c.gpus, which=("list", "show"))

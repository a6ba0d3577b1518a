"""``scripts/gpu-check``: this node's GPU inventory, exactly as the agent publishes it, checked for NVML/sysfs
agreement.

Prints one JSON document on stdout: ``node``, ``gpus`` (each the ``spec`` of the ``gpu`` record the agent writes,
with ``live`` figures from NVML beside it), ``nvml`` (``ok`` or why it cannot be used), ``iommu_enabled``, ``reason``
(why there are no GPUs) and ``mismatches``; and one line per finding on stderr.

Exit status: 0 — the inventory is consistent (this includes a node without NVIDIA GPUs: it says so); 1 — NVML and
sysfs disagree (a GPU NVML reports that sysfs does not show, or one bound to ``nvidia`` that NVML does not report);
2 — bad arguments.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Sequence

import msgspec

from agent.gpu.inventory import Inventory, discover
from agent.gpu.nvml import NvmlSource, PynvmlSource
from agent.gpu.sysfs import Sysfs


def report(inv: Inventory) -> dict[str, object]:
    """The JSON document ``gpu-check`` prints."""
    return {
        "node": inv.node,
        "gpus": [
            {
                "spec": msgspec.to_builtins(g.spec),
                "live": {
                    "temperature_c": g.temperature_c,
                    "utilization_pct": g.utilization_pct,
                    "memory_used_mib": g.memory_used_mib,
                    "power_w": g.power_w,
                },
            }
            for g in inv.gpus
        ],
        "nvml": inv.nvml_reason or "ok",
        "iommu_enabled": inv.iommu_enabled,
        "reason": inv.reason,
        "mismatches": inv.mismatches(),
    }


def main(argv: Sequence[str] | None = None, *, nvml: NvmlSource | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--node", default=socket.gethostname(), help="the node name to publish under (default: hostname)")
    p.add_argument("--sysfs", default="/sys", help="where sysfs is mounted (default: /sys)")
    args = p.parse_args(argv)
    inv = discover(args.node, nvml or PynvmlSource(), Sysfs(args.sysfs))
    doc = report(inv)
    print(json.dumps(doc, indent=2, sort_keys=True))
    if not inv.gpus:
        print(f"gpu-check: {inv.reason}", file=sys.stderr)
    for g in inv.gpus:
        s = g.spec
        state = "passthrough-capable" if s.capable else f"not capable: {s.reason}"
        print(f"gpu-check: {s.pci_address} {s.model} ({s.driver or 'no driver'}, {s.source}): {state}", file=sys.stderr)
    for problem in inv.mismatches():
        print(f"gpu-check: MISMATCH: {problem}", file=sys.stderr)
    return 1 if inv.mismatches() else 0


if __name__ == "__main__":
    sys.exit(main())

"""The real GPU drivers on this host: NVML through nvidia-ml-py and the PCI tree in /sys. These CI machines have no
NVIDIA GPU and no libnvidia-ml.so.1, so discovery must report none and why, log no warning or error, and
``scripts/gpu-check`` must say so and exit 0. On a host with an NVIDIA GPU the same checks print its inventory and
require NVML and sysfs to agree."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from agent.gpu.inventory import discover
from agent.gpu.nvml import PynvmlSource
from agent.gpu.sysfs import Sysfs

ROOT = Path(__file__).resolve().parents[2]


def test_discovery_on_this_host_reports_its_gpus_or_why_none_without_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    inv = discover("here", PynvmlSource(), Sysfs())
    assert inv.mismatches() == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if inv.gpus:  # a GPU host: every GPU found, NVML agreeing
        assert all(g.spec.pci_id.startswith("10de:") for g in inv.gpus)
        return
    assert inv.reason.startswith("no NVIDIA GPU on this node")


def test_gpu_check_prints_the_inventory_and_agrees_with_the_host() -> None:
    done = subprocess.run([str(ROOT / "scripts" / "gpu-check")], capture_output=True, text=True, timeout=60)
    doc = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr  # no mismatch between NVML and sysfs
    assert set(doc) == {"gpus", "iommu_enabled", "mismatches", "node", "nvml", "reason"}
    if not doc["gpus"]:
        assert "no NVIDIA GPU on this node" in done.stderr and doc["reason"].startswith("no NVIDIA GPU")

"""``scripts/gpu-check`` (the JSON it prints, its exit status on a mismatch and on this GPU-less machine) and the
VFIO binding's sysfs writes (bind, check, give back; idempotent)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from agent.gpu import vfio
from agent.gpu.check import main
from agent.gpu.nvml import PynvmlSource
from tests.unit.gpu.fakes import FakeGpu, FakePynvml, FakeSysfs

ROOT = Path(__file__).resolve().parents[3]


def _run(argv: list[str], nvml: FakePynvml) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv, nvml=PynvmlSource(nvml))
    return rc, json.loads(out.getvalue()), err.getvalue()


def test_gpu_check_prints_the_published_specs_and_fails_on_a_mismatch(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", group="7")
    h100 = FakeGpu(uuid="GPU-a", name="NVIDIA H100 80GB HBM3", bus_id="00000000:3B:00.0")
    rc, doc, err = _run(["--node", "n1", "--sysfs", str(fs.root)], FakePynvml([h100]))
    assert rc == 0 and doc["mismatches"] == [] and doc["nvml"] == "ok"
    (g,) = doc["gpus"]
    assert g["spec"]["node"] == "n1" and g["spec"]["uuid"] == "GPU-a" and g["spec"]["capable"] is True
    assert g["live"]["temperature_c"] == 41.0
    assert "0000:3b:00.0 H100 80GB HBM3 (nvidia, nvml): passthrough-capable" in err
    rc, doc, err = _run(["--node", "n1", "--sysfs", str(fs.root)], FakePynvml([]))  # NVML lost it
    assert rc == 1 and "MISMATCH: 0000:3b:00.0 is bound to the nvidia driver, but NVML does not report it" in err


def _tree(tmp_path: Path, driver: str) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", driver=driver, group="7")
    fs.add("0000:3b:00.1", device="0x22a3", cls="0x040300", driver="snd_hda_intel" if driver else "", group="7")
    (fs.root / "bus" / "pci" / "drivers_probe").touch()
    return fs


def test_bind_writes_the_override_unbinds_and_probes(tmp_path: Path) -> None:
    fs = _tree(tmp_path, "nvidia")
    functions = ["0000:3b:00.0", "0000:3b:00.1"]
    with pytest.raises(vfio.BindingError, match=r"0000:3b:00.0 \(nvidia\), 0000:3b:00.1 \(snd_hda_intel\)"):
        vfio.check_bound(functions, fs.root)
    assert vfio.bind(functions, fs.root) == functions
    dev = fs.devices / "0000:3b:00.0"
    assert (dev / "driver_override").read_text() == "vfio-pci"
    assert (fs.drivers / "nvidia" / "unbind").read_text() == "0000:3b:00.0"
    assert (fs.drivers / "snd_hda_intel" / "unbind").read_text() == "0000:3b:00.1"
    assert (fs.root / "bus" / "pci" / "drivers_probe").read_text() == "0000:3b:00.1"


def test_bound_functions_pass_the_check_and_are_given_back(tmp_path: Path) -> None:
    fs = _tree(tmp_path, "vfio-pci")
    # the kernel's part (the re-bind after a probe) is not simulated: make both vfio-bound as the kernel would
    os.unlink(fs.devices / "0000:3b:00.1" / "driver")
    os.symlink(fs.drivers / "vfio-pci", fs.devices / "0000:3b:00.1" / "driver")
    functions = ["0000:3b:00.0", "0000:3b:00.1"]
    vfio.check_bound(functions, fs.root)
    assert vfio.bind(functions, fs.root) == []  # already bound: nothing to do
    assert vfio.give_back(functions, fs.root) == functions
    assert (fs.devices / "0000:3b:00.0" / "driver_override").read_text() == "\n"
    assert (fs.drivers / "vfio-pci" / "unbind").read_text() == "0000:3b:00.1"
    assert vfio.give_back(["0000:ff:00.0"], fs.root) == []  # a function that is gone: nothing to give back

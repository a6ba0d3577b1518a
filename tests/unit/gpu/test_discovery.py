"""GPU discovery against a fake NVML and a fake sysfs tree: inventory, IOMMU judgement, MIG, vfio-bound GPUs found
from sysfs, NVML missing, and the NVML/sysfs mismatches ``scripts/gpu-check`` reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.gpu.inventory import discover
from agent.gpu.nvml import NvmlUnavailable, PynvmlSource, cuda_version, normalise_bus_id
from agent.gpu.sysfs import Sysfs
from tests.unit.gpu.fakes import FakeGpu, FakePynvml, FakeSysfs

H100 = FakeGpu(uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", bus_id="00000000:3B:00.0")


def _tree(tmp_path: Path, *, iommu: bool = True) -> FakeSysfs:
    fs = FakeSysfs(tmp_path / "sys", iommu=iommu)
    fs.add("0000:00:01.0", vendor="0x8086", device="0x1234", cls="0x060400", driver="pcieport", group="7")
    fs.add("0000:3b:00.0", group="7")
    fs.add("0000:3b:00.1", device="0x22a3", cls="0x040300", driver="snd_hda_intel", group="7")
    return fs


def test_inventory_joins_nvml_and_sysfs(tmp_path: Path) -> None:
    fs = _tree(tmp_path)
    nv = FakePynvml([H100])
    inv = discover("n1", PynvmlSource(nv), Sysfs(fs.root))
    assert inv.reason == "" and inv.mismatches() == [] and inv.iommu_enabled
    (g,) = inv.gpus
    s = g.spec
    assert (s.node, s.pci_address, s.pci_id, s.model, s.uuid, s.index) == (
        "n1", "0000:3b:00.0", "10de:2330", "H100 80GB HBM3", "GPU-aaaa", 0,
    )  # fmt: skip
    assert (s.memory_mib, s.driver, s.driver_version, s.cuda_version, s.source) == (
        81559, "nvidia", "550.54.15", "12.4", "nvml",
    )  # fmt: skip
    assert s.power_limit_w == 700.0 and s.mig_mode == "disabled"
    # the bridge stays behind; the audio function goes with the GPU
    assert s.capable and s.reason == "" and s.iommu_group == "7"
    assert s.functions == ["0000:3b:00.0", "0000:3b:00.1"]
    assert (g.temperature_c, g.utilization_pct, g.memory_used_mib, g.power_w) == (41.0, 12.0, 1024, 85.0)
    assert nv.inits == nv.shutdowns == 1


def test_shared_iommu_group_is_not_capable_and_names_the_intruder(tmp_path: Path) -> None:
    fs = _tree(tmp_path)
    fs.add("0000:00:1f.3", vendor="0x8086", device="0xa348", cls="0x040300", driver="snd_hda_intel", group="7")
    (g,) = discover("n1", PynvmlSource(FakePynvml([H100])), Sysfs(fs.root)).gpus
    assert not g.spec.capable
    assert "IOMMU group 7 also holds 0000:00:1f.3 (class 0x040300, driver snd_hda_intel)" in g.spec.reason


def test_iommu_off_is_not_capable_and_says_what_to_put_on_the_command_line(tmp_path: Path) -> None:
    fs = _tree(tmp_path, iommu=False)
    inv = discover("n1", PynvmlSource(FakePynvml([H100])), Sysfs(fs.root))
    (g,) = inv.gpus
    assert not inv.iommu_enabled and not g.spec.capable and g.spec.iommu_group == ""
    assert "intel_iommu=on" in g.spec.reason and "amd_iommu=on" in g.spec.reason
    assert g.spec.functions == ["0000:3b:00.0", "0000:3b:00.1"]  # its slot's functions all the same


def test_mig_devices_are_listed(tmp_path: Path) -> None:
    gpu = FakeGpu(
        uuid="GPU-m", name="NVIDIA A100-SXM4-40GB", bus_id="00000000:3B:00.0", memory_mib=40960, mig=(1, 1),
        migs=[("MIG-1", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19968), ("MIG-2", "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 19968)],
    )  # fmt: skip
    (g,) = discover("n1", PynvmlSource(FakePynvml([gpu])), Sysfs(_tree(tmp_path).root)).gpus
    assert g.spec.mig_mode == "enabled"
    assert [(m.index, m.uuid, m.memory_mib) for m in g.spec.mig_devices] == [(0, "MIG-1", 19968), (1, "MIG-2", 19968)]


def test_a_gpu_bound_to_vfio_is_found_from_sysfs_and_named_from_pci_ids(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", driver="vfio-pci", group="7")
    fs.add("0000:3b:00.1", device="0x22a3", cls="0x040300", driver="vfio-pci", group="7")
    fs.add("0000:af:00.0", device="0x20b0", driver="nvidia", group="9")
    ids = tmp_path / "pci.ids"
    ids.write_text(
        "# comment\n8086  Intel Corporation\n\t1234  Something\n10de  NVIDIA Corporation\n"
        "\t2330  GH100 [H100 SXM5 80GB]\n\t\t10de 16c1  H100 SXM5 80GB\n1002  Advanced Micro Devices\n"
    )
    # NVML sees only the GPU the nvidia driver holds
    a100 = FakeGpu(uuid="GPU-b", name="NVIDIA A100-SXM4-40GB", bus_id="00000000:AF:00.0")
    inv = discover("n1", PynvmlSource(FakePynvml([a100])), Sysfs(fs.root, pci_ids=(tmp_path / "none", ids)))
    vfio, nvidia = inv.gpus
    assert (vfio.spec.pci_address, vfio.spec.driver, vfio.spec.source) == ("0000:3b:00.0", "vfio-pci", "sysfs")
    assert vfio.spec.model == "GH100 [H100 SXM5 80GB]" and vfio.spec.uuid == "" and vfio.spec.index is None
    assert vfio.spec.capable and vfio.spec.functions == ["0000:3b:00.0", "0000:3b:00.1"]
    assert (nvidia.spec.source, nvidia.spec.model) == ("nvml", "A100-SXM4-40GB")
    assert inv.mismatches() == []


def test_nvml_missing_gives_sysfs_gpus_and_a_reason_without_raising(tmp_path: Path) -> None:
    fs = _tree(tmp_path)
    nv = FakePynvml([], init_error=FakePynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    inv = discover("n1", PynvmlSource(nv), Sysfs(fs.root, pci_ids=()))
    (g,) = inv.gpus
    assert "libnvidia-ml.so.1" in inv.nvml_reason
    assert g.spec.source == "sysfs" and g.spec.model == "NVIDIA device 10de:2330"
    assert inv.mismatches() == []  # NVML absent: nothing to compare against
    with pytest.raises(NvmlUnavailable, match="kernel driver is not loaded"):
        PynvmlSource(FakePynvml([], init_error=FakePynvml.NVML_ERROR_DRIVER_NOT_LOADED)).read()


def test_no_nvidia_hardware_reports_none_and_why(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:00:05.0", vendor="0x1af4", device="0x1000", cls="0x020000", driver="virtio-pci", group="1")
    fs.add("0000:00:02.0", vendor="0x1234", device="0x1111", cls="0x030000", driver="bochs-drm", group="2")
    nv = FakePynvml([], init_error=FakePynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    inv = discover("n1", PynvmlSource(nv), Sysfs(fs.root))
    assert inv.gpus == () and inv.mismatches() == []
    assert inv.reason.startswith("no NVIDIA GPU on this node") and "libnvidia-ml.so.1" in inv.reason


def test_mismatches_between_nvml_and_sysfs(tmp_path: Path) -> None:
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", group="7")  # bound to nvidia, but NVML does not list it
    ghost = FakeGpu(uuid="GPU-g", name="NVIDIA L4", bus_id="00000000:5E:00.0")  # NVML lists what sysfs lacks
    inv = discover("n1", PynvmlSource(FakePynvml([ghost])), Sysfs(fs.root))
    assert inv.mismatches() == [
        "NVML reports a GPU at 0000:5e:00.0, but sysfs has no NVIDIA display controller there",
        "0000:3b:00.0 is bound to the nvidia driver, but NVML does not report it",
    ]


def test_unsupported_figures_are_none(tmp_path: Path) -> None:
    gpu = FakeGpu(
        uuid="GPU-t", name="NVIDIA T4", bus_id="00000000:3B:00.0", mig=None, power_limit_mw=None, power_mw=None,
        temperature=None, utilization=None,
    )  # fmt: skip
    (g,) = discover("n1", PynvmlSource(FakePynvml([gpu])), Sysfs(_tree(tmp_path).root)).gpus
    assert g.spec.mig_mode == "unsupported" and g.spec.power_limit_w is None
    assert (g.temperature_c, g.utilization_pct, g.power_w) == (None, None, None)


def test_bus_id_and_cuda_version_spelling() -> None:
    assert normalise_bus_id(b"00000000:3B:00.0") == "0000:3b:00.0"
    assert normalise_bus_id("0001:AF:00.1") == "0001:af:00.1"
    assert cuda_version(12040) == "12.4" and cuda_version(11080) == "11.8"

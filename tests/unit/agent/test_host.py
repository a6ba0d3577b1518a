"""The KVM-or-TCG decision."""

from __future__ import annotations

from agent.host import detect_virt


def test_kvm_needs_both_the_device_and_cpu_flags(tmp_path):
    dev = tmp_path / "kvm"
    dev.write_text("")
    with_vmx = tmp_path / "cpuinfo-vmx"
    with_vmx.write_text("processor : 0\nflags : fpu vmx sse\n")
    without = tmp_path / "cpuinfo"
    without.write_text("processor : 0\nflags : fpu sse\n")
    assert detect_virt(str(dev), str(with_vmx)).virt_type == "kvm"
    soft = detect_virt(str(dev), str(without))
    assert soft.virt_type == "qemu" and "software KVM" in soft.reason
    missing = detect_virt(str(tmp_path / "nope"), str(with_vmx))
    assert missing.virt_type == "qemu" and "missing" in missing.reason

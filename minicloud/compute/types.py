"""Instance types: the built-in catalogue and the rules for admin-defined types."""

from __future__ import annotations

from minicloud.model.compute import InstanceType

TYPE_KIND = "instancetype"

#: Built-in shapes, OpenStack's m1 family, except that m1.tiny is the smallest that boots the test guest.
BUILTIN: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType(name="m1.tiny", vcpus=1, memory_mib=128, disk_gib=1, builtin=True, description="test guests"),
        InstanceType(name="m1.small", vcpus=1, memory_mib=2048, disk_gib=20, builtin=True),
        InstanceType(name="m1.medium", vcpus=2, memory_mib=4096, disk_gib=40, builtin=True),
        InstanceType(name="m1.large", vcpus=4, memory_mib=8192, disk_gib=80, builtin=True),
        InstanceType(name="m1.xlarge", vcpus=8, memory_mib=16384, disk_gib=160, builtin=True),
    )
}

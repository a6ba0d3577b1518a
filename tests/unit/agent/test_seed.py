"""NoCloud seeds: the ISO is labelled ``cidata`` and holds the cloud-init files under their real names.

The image is parsed here in Python (no isoinfo on the machines): the primary volume descriptor at sector 16, the root
directory with its Rock Ridge NM/PX entries, and the Joliet tree. ``blkid`` (what cloud-init uses to find the seed)
is asked for the label too when it is installed. tests/integration/test_guest_image.py boots a Linux guest on a seed.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.compute.seed import SECTOR, iso9660_image, meta_data, network_config_dhcp, write_nocloud_seed

USER_DATA = b"#cloud-config\nruncmd:\n  - echo hello\n"


@dataclass(frozen=True)
class Entry:
    identifier: bytes
    lba: int
    size: int
    is_dir: bool
    system_use: bytes


def _u32(b: bytes, off: int) -> int:
    le, be = struct.unpack_from("<I", b, off)[0], struct.unpack_from(">I", b, off + 4)[0]
    assert le == be, "both-endian field disagrees"
    return le


def _records(image: bytes, lba: int, size: int) -> list[Entry]:
    out, off, end = [], lba * SECTOR, lba * SECTOR + size
    while off < end and image[off] != 0:
        length = image[off]
        assert length % 2 == 0, "directory records have an even length"
        name_len = image[off + 32]
        name = image[off + 33 : off + 33 + name_len]
        su_start = off + 33 + name_len + (1 - name_len % 2)
        out.append(
            Entry(
                name,
                _u32(image, off + 2),
                _u32(image, off + 10),
                bool(image[off + 25] & 2),
                image[su_start : off + length],
            )
        )
        off += length
    return out


def _susp(system_use: bytes) -> dict[bytes, bytes]:
    entries, i = {}, 0
    while i + 4 <= len(system_use):
        sig, length = system_use[i : i + 2], system_use[i + 2]
        if length == 0:
            break
        entries[sig] = system_use[i + 4 : i + length]
        i += length
    return entries


def _descriptor(image: bytes, kind: int) -> bytes:
    for sector in range(16, 32):
        vd = image[sector * SECTOR : (sector + 1) * SECTOR]
        assert vd[1:6] == b"CD001"
        if vd[0] == kind:
            return vd
        if vd[0] == 255:
            break
    raise AssertionError(f"no volume descriptor of type {kind}")


def _root(vd: bytes) -> tuple[int, int]:
    return _u32(vd, 156 + 2), _u32(vd, 156 + 10)


def rock_ridge_files(image: bytes) -> dict[str, tuple[bytes, int]]:
    """name -> (content, POSIX mode) through the primary tree's Rock Ridge names."""
    entries = _records(image, *_root(_descriptor(image, 1)))
    dot = _susp(entries[0].system_use)
    assert dot[b"SP"] == b"\xbe\xef\x00", "SUSP SP must open the root's '.' record"
    ce = dot[b"CE"]
    er = _susp(image[_u32(ce, 0) * SECTOR + _u32(ce, 8) : _u32(ce, 0) * SECTOR + _u32(ce, 8) + _u32(ce, 16)])
    assert b"RRIP_1991A" in er[b"ER"]
    files = {}
    for e in entries[2:]:
        su = _susp(e.system_use)
        assert not e.is_dir
        files[su[b"NM"][1:].decode()] = (image[e.lba * SECTOR : e.lba * SECTOR + e.size], _u32(su[b"PX"], 0))
    return files


def joliet_files(image: bytes) -> dict[str, bytes]:
    svd = _descriptor(image, 2)
    assert svd[88:91] == b"%/E"
    assert svd[40:72].decode("utf-16-be").rstrip() == "cidata"
    entries = _records(image, *_root(svd))
    return {
        e.identifier.decode("utf-16-be").removesuffix(";1"): image[e.lba * SECTOR : e.lba * SECTOR + e.size]
        for e in entries[2:]
    }


def test_seed_is_labelled_cidata_and_holds_the_three_files(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    md = meta_data("i-0123", "web-1")
    write_nocloud_seed(seed, meta_data=md, user_data=USER_DATA, network_config=network_config_dhcp())
    image = seed.read_bytes()

    assert len(image) % SECTOR == 0
    pvd = _descriptor(image, 1)
    assert pvd[40:72].rstrip(b" ") == b"cidata"
    assert _u32(pvd, 80) * SECTOR == len(image)

    expected = {"meta-data": md.encode(), "user-data": USER_DATA, "network-config": network_config_dhcp().encode()}
    assert {name: content for name, (content, _) in rock_ridge_files(image).items()} == expected
    assert all(mode == 0o100444 for _, mode in rock_ridge_files(image).values())
    assert joliet_files(image) == expected
    iso_names = sorted(e.identifier for e in _records(image, *_root(pvd))[2:])
    assert iso_names == [b"META_DAT.;1", b"NETWORK_.;1", b"USER_DAT.;1"]


def test_network_config_is_left_out_when_not_given(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    write_nocloud_seed(seed, meta_data=meta_data("i-1", "h"), user_data=b"")
    files = rock_ridge_files(seed.read_bytes())
    assert sorted(files) == ["meta-data", "user-data"]
    assert files["user-data"][0] == b""


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid (util-linux) is not installed")
def test_blkid_sees_the_cidata_label(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    write_nocloud_seed(seed, meta_data=meta_data("i-1", "h"), user_data=USER_DATA)
    out = subprocess.run(["blkid", "-p", "-o", "export", str(seed)], capture_output=True, text=True, check=True).stdout
    assert "LABEL=cidata" in out.splitlines()
    assert "TYPE=iso9660" in out.splitlines()


def test_seed_is_deterministic() -> None:
    files = {"meta-data": b"a", "user-data": b"b" * 5000}
    assert iso9660_image("cidata", files) == iso9660_image("cidata", dict(reversed(files.items())))


def test_files_larger_than_a_sector_are_stored_whole() -> None:
    big = bytes(range(256)) * 40  # 10240 bytes: five sectors
    files = rock_ridge_files(iso9660_image("cidata", {"meta-data": b"x", "user-data": big}))
    assert files["user-data"][0] == big
    assert files["meta-data"][0] == b"x"


def test_write_replaces_an_existing_seed_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"old")
    write_nocloud_seed(seed, meta_data=meta_data("i-1", "new"), user_data=USER_DATA)
    assert rock_ridge_files(seed.read_bytes())["meta-data"][0] == meta_data("i-1", "new").encode()
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_failed_write_keeps_the_old_seed_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_nocloud_seed(seed, meta_data=meta_data("i-1", "h"), user_data=USER_DATA)
    assert seed.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_names_that_collide_in_8_3_form_are_refused() -> None:
    with pytest.raises(ValueError, match="collide"):
        iso9660_image("cidata", {"user-data": b"", "user-data2": b""})


@pytest.mark.parametrize("name", ["", "a/b", "x" * 63, "."])
def test_unsupported_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="unsupported file name"):
        iso9660_image("cidata", {name: b""})


def test_meta_data_is_nocloud_yaml_with_public_keys() -> None:
    key = "ssh-ed25519 " + "A" * 300 + " alice@laptop"
    doc = yaml.safe_load(meta_data("i-0123", "web-1", public_keys=[key, "ssh-rsa BBBB bob\n"]))
    assert doc == {"instance-id": "i-0123", "local-hostname": "web-1", "public-keys": [key, "ssh-rsa BBBB bob"]}
    assert yaml.safe_load(meta_data("i-1", "h")) == {"instance-id": "i-1", "local-hostname": "h"}
    # the test guest's init reads the hostname with sed: it must be on its own plain line
    assert "local-hostname: web-1" in meta_data("i-0123", "web-1").splitlines()


def test_network_config_dhcps_on_each_nic_matched_by_mac() -> None:
    assert yaml.safe_load(network_config_dhcp(["52:AA:bb:cc:dd:ee", "52:00:00:00:00:01"])) == {
        "version": 2,
        "ethernets": {
            "nic0": {"match": {"macaddress": "52:aa:bb:cc:dd:ee"}, "dhcp4": True},
            "nic1": {"match": {"macaddress": "52:00:00:00:00:01"}, "dhcp4": True},
        },
    }
    assert yaml.safe_load(network_config_dhcp()) == {"version": 2, "ethernets": {}}

"""NoCloud seeds for cloud-init: the ``meta-data``/``user-data``/``network-config`` files on an ISO 9660 image.

cloud-init's NoCloud datasource finds the seed by its filesystem label ``cidata`` and reads the files by their exact
lowercase names. Plain ISO 9660 only allows 8.3 upper-case names, so the image carries the real names twice, as
``cloud-localds`` (``genisoimage -joliet -rock``) does: in Rock Ridge ``NM`` entries (used by Linux, FreeBSD) and in a
Joliet tree (used by Windows and 7-Zip). The image is written by the small pure-Python writer below, as no ISO tool
(genisoimage, xorriso, pycdlib) is installed on the nodes.

The writer is deterministic: the same files give byte-identical images (all timestamps are fixed at 1970-01-01).
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

SECTOR = 2048
VOLUME_ID = "cidata"

# ISO 9660 layout of the images we write (in 2048-byte sectors); one directory sector per tree is plenty for a seed.
_PVD, _SVD, _TERM = 16, 17, 18
_PATH_L, _PATH_M, _JPATH_L, _JPATH_M = 19, 20, 21, 22
_ROOT, _JROOT, _CE = 23, 24, 25
_FIRST_FILE = 26

_DATE7 = bytes([70, 1, 1, 0, 0, 0, 0])  # directory record time: 1970-01-01 00:00:00 UTC
_DATE17_UNSET = b"0" * 16 + b"\0"  # volume descriptor time "not specified"
_FILE_MODE = 0o100444  # regular file, r--r--r--
_DIR_MODE = 0o040555  # directory, r-xr-xr-x

_RRIP_ID = b"RRIP_1991A"
_RRIP_DESCRIPTOR = b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS"
_RRIP_SOURCE = (
    b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  "
    b"SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION."
)


# --- the cloud-init files ------------------------------------------------------------------------------------------


def meta_data(instance_id: str, hostname: str, public_keys: Sequence[str] = ()) -> str:
    """NoCloud ``meta-data`` (YAML): ``instance-id``, ``local-hostname`` and, if given, ``public-keys``.

    cloud-init installs ``public-keys`` (OpenSSH public key lines) for the default user. A changed ``instance-id``
    makes cloud-init treat the next boot as a first boot.
    """
    doc: dict[str, object] = {"instance-id": instance_id, "local-hostname": hostname}
    if public_keys:
        doc["public-keys"] = [k.strip() for k in public_keys]
    # A huge width keeps every key on one line (PyYAML folds long plain scalars at 80 columns otherwise).
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True, width=1 << 30)


def network_config_dhcp(macs: Sequence[str] = ()) -> str:
    """cloud-init ``network-config`` (version 2): DHCPv4 on each NIC, matched by its MAC address.

    Matching by MAC works with every cloud-init renderer (netplan, networkd, ENI, sysconfig); a name glob such as
    ``e*`` does not (cloud-init 22.4's networkd renderer writes it out as an interface name, and the guest never gets
    an address). Without MACs: an empty ``ethernets`` map, which leaves the image's own defaults alone.
    """
    lines = ["version: 2", "ethernets:" + ("" if macs else " {}")]
    for i, mac in enumerate(macs):
        lines += [f"  nic{i}:", "    match:", f'      macaddress: "{mac.lower()}"', "    dhcp4: true"]
    return "\n".join(lines) + "\n"


def write_nocloud_seed(path: Path, *, meta_data: str, user_data: bytes, network_config: str | None = None) -> None:
    """Write a NoCloud seed ISO (label ``cidata``) to ``path``, replacing any file there.

    Atomic: the image is written to a temporary file in the same directory, fsynced and renamed over ``path``, so a
    reader sees the old seed or the new one, never a partial one; on failure the temporary file is removed. Text is
    encoded as UTF-8; ``network-config`` is left out when None (cloud-init then DHCPs on the first NIC).
    """
    files = {"meta-data": meta_data.encode(), "user-data": user_data}
    if network_config is not None:
        files["network-config"] = network_config.encode()
    image = iso9660_image(VOLUME_ID, files)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- ISO 9660 + Rock Ridge + Joliet ----------------------------------------------------------------------------------


def _both16(n: int) -> bytes:
    return struct.pack("<H", n) + struct.pack(">H", n)


def _both32(n: int) -> bytes:
    return struct.pack("<I", n) + struct.pack(">I", n)


def _padded(text: bytes, n: int, fill: bytes = b" ") -> bytes:
    """``text`` padded to exactly ``n`` bytes with repeats of ``fill`` (a UCS-2 space for Joliet)."""
    if len(text) > n:
        raise ValueError(f"{text!r} is longer than {n} bytes")
    return (text + fill * n)[:n]


def _record(identifier: bytes, lba: int, size: int, *, is_dir: bool, system_use: bytes = b"") -> bytes:
    """One directory record (ECMA-119 9.1), with an optional System Use area for SUSP/Rock Ridge entries."""
    pad = b"\0" if len(identifier) % 2 == 0 else b""
    body = (
        bytes([0])  # extended attribute record length
        + _both32(lba)
        + _both32(size)
        + _DATE7
        + bytes([2 if is_dir else 0, 0, 0])  # flags, file unit size, interleave gap
        + _both16(1)  # volume sequence number
        + bytes([len(identifier)])
        + identifier
        + pad
        + system_use
    )
    if len(body) % 2 == 0:  # records have an even length; the padding byte counts in it
        body += b"\0"
    length = len(body) + 1
    if length > 255:
        raise ValueError(f"directory record for {identifier!r} is {length} bytes; the limit is 255")
    return bytes([length]) + body


def _susp(sig: bytes, data: bytes) -> bytes:
    """A SUSP entry: signature, length, version 1, data."""
    return sig + bytes([len(data) + 4, 1]) + data


def _px(mode: int, nlink: int) -> bytes:
    """Rock Ridge POSIX attributes (RRIP 1.10 form): mode, links, uid 0, gid 0."""
    return _susp(b"PX", _both32(mode) + _both32(nlink) + _both32(0) + _both32(0))


def _nm(name: str) -> bytes:
    """Rock Ridge alternate name: the file's real name."""
    return _susp(b"NM", bytes([0]) + name.encode())


def _er() -> bytes:
    """SUSP extension reference announcing Rock Ridge; lives in the continuation area (too long for a record)."""
    lengths = bytes([len(_RRIP_ID), len(_RRIP_DESCRIPTOR), len(_RRIP_SOURCE), 1])
    return _susp(b"ER", lengths + _RRIP_ID + _RRIP_DESCRIPTOR + _RRIP_SOURCE)


def _iso_name(name: str) -> bytes:
    """The level-1 (8.3, d-characters) file identifier for ``name``, e.g. ``meta-data`` -> ``META_DAT.;1``."""
    stem, _, ext = name.upper().rpartition(".") if "." in name else (name.upper(), "", "")
    stem, ext = re.sub(r"[^A-Z0-9_]", "_", stem)[:8], re.sub(r"[^A-Z0-9_]", "_", ext)[:3]
    return f"{stem}.{ext};1".encode()


def _volume_descriptor(
    kind: int, volume_id: bytes, total: int, path_l: int, path_m: int, root: bytes, *, joliet: bool
) -> bytes:
    """A primary (kind 1) or Joliet supplementary (kind 2) volume descriptor (ECMA-119 8.4 / 8.5)."""
    space = b"\0 " if joliet else b" "
    fields = (
        bytes([kind])
        + b"CD001\x01\x00"
        + _padded(b"", 32, space)  # system identifier
        + _padded(volume_id, 32, space)
        + b"\0" * 8
        + _both32(total)
        + (b"%/E".ljust(32, b"\0") if joliet else b"\0" * 32)  # Joliet: UCS-2 level 3 escape sequence
        + _both16(1)  # volume set size
        + _both16(1)  # volume sequence number
        + _both16(SECTOR)
        + _both32(10)  # path table size: one 10-byte entry, the root
        + struct.pack("<I", path_l)
        + b"\0" * 4
        + struct.pack(">I", path_m)
        + b"\0" * 4
        + root
        + _padded(b"", 128, space) * 3  # volume set, publisher, data preparer
        + _padded(("MINICLOUD".encode("utf-16-be") if joliet else b"MINICLOUD"), 128, space)  # application
        + _padded(b"", 37, space) * 3  # copyright, abstract, bibliographic file identifiers
        + _DATE17_UNSET * 4
        + b"\x01\x00"  # file structure version
    )
    return fields.ljust(SECTOR, b"\0")


def _path_table(root_lba: int, big_endian: bool) -> bytes:
    fmt = ">IH" if big_endian else "<IH"
    return (bytes([1, 0]) + struct.pack(fmt, root_lba, 1) + b"\0\0").ljust(SECTOR, b"\0")


def iso9660_image(volume_id: str, files: Mapping[str, bytes]) -> bytes:
    """An ISO 9660 image with ``files`` in its root directory, named by Rock Ridge and Joliet as given.

    Limits (raises ValueError): names up to 62 characters without ``/``, whose 8.3 forms differ; one directory sector
    per tree (a handful of files); a volume id of up to 16 characters. The result is deterministic.
    """
    if not 0 < len(volume_id) <= 16:
        raise ValueError("the volume id must have 1 to 16 characters")
    names = sorted(files)
    for name in names:
        if not name or "/" in name or "\0" in name or len(name) > 62 or name in (".", ".."):
            raise ValueError(f"unsupported file name {name!r}")
    iso_names = {name: _iso_name(name) for name in names}
    if len(set(iso_names.values())) != len(names):
        raise ValueError(f"file names collide in their ISO 9660 8.3 form: {sorted(iso_names.values())}")

    extents: dict[str, int] = {}
    data = bytearray()
    lba = _FIRST_FILE
    for name in names:
        extents[name] = lba
        content = files[name]
        data += content + b"\0" * (-len(content) % SECTOR)
        lba += -(-len(content) // SECTOR)
    total = lba

    # Primary tree, with Rock Ridge. SUSP requires SP first in the root's "." record; ER sits in a continuation area.
    er = _er()
    ce = _susp(b"CE", _both32(_CE) + _both32(0) + _both32(len(er)))
    sp = _susp(b"SP", b"\xbe\xef\x00")
    root = [
        _record(b"\0", _ROOT, SECTOR, is_dir=True, system_use=sp + _px(_DIR_MODE, 2) + ce),
        _record(b"\1", _ROOT, SECTOR, is_dir=True, system_use=_px(_DIR_MODE, 2)),
    ]
    for iso_name, name in sorted((iso_names[n], n) for n in names):
        su = _px(_FILE_MODE, 1) + _nm(name)
        root.append(_record(iso_name, extents[name], len(files[name]), is_dir=False, system_use=su))

    # Joliet tree: the same extents, names in UCS-2 big-endian.
    jroot = [_record(b"\0", _JROOT, SECTOR, is_dir=True), _record(b"\1", _JROOT, SECTOR, is_dir=True)]
    for jname, name in sorted((f"{n};1".encode("utf-16-be"), n) for n in names):
        jroot.append(_record(jname, extents[name], len(files[name]), is_dir=False))

    sectors: list[bytes] = []
    for tree in (root, jroot):
        directory = b"".join(tree)
        if len(directory) > SECTOR:
            raise ValueError("too many files for a one-sector root directory")
        sectors.append(directory.ljust(SECTOR, b"\0"))

    image = bytearray(b"\0" * (16 * SECTOR))
    image += _volume_descriptor(
        1, volume_id.encode(), total, _PATH_L, _PATH_M, _record(b"\0", _ROOT, SECTOR, is_dir=True), joliet=False
    )
    image += _volume_descriptor(
        2,
        volume_id.encode("utf-16-be"),
        total,
        _JPATH_L,
        _JPATH_M,
        _record(b"\0", _JROOT, SECTOR, is_dir=True),
        joliet=True,
    )
    image += b"\xffCD001\x01".ljust(SECTOR, b"\0")
    image += _path_table(_ROOT, False) + _path_table(_ROOT, True)
    image += _path_table(_JROOT, False) + _path_table(_JROOT, True)
    image += sectors[0] + sectors[1]
    image += er.ljust(SECTOR, b"\0")
    image += data
    assert len(image) == total * SECTOR
    return bytes(image)

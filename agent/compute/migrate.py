"""Live migration, the node-local pieces: libvirt's and QEMU's TLS files and configuration, and the source's
rewrite of the guest's live definition with the target's paths.

**TLS.** Nodes' libvirtds talk to each other only over TLS with the cluster CA: :func:`write_tls_files` lays the
node's cluster certificate out under ``<data_dir>/pki/libvirt`` in the names libvirt (``cacert.pem``,
``servercert.pem``…) and QEMU (``ca-cert.pem``, ``server-cert.pem``…) read. libvirtd listens with
``listen_tls = 1`` (and no TCP listener) using :func:`libvirtd_conf`'s lines, and QEMU's migration and NBD streams use
TLS with certificate checks both ways (:func:`qemu_conf`: ``migrate_tls_x509_verify``, ``migrate_tls_force``). The
source's libvirtd reaches the target at ``qemu+tls://<address>/system?pkipath=<dir>``; a client without a
certificate of the cluster CA is refused by the target's libvirtd and by its QEMU.

This module holds the node-local pieces (the TLS files and configuration lines, the rewrite of the live definition);
the migration itself is run by the compute reconciler through :mod:`agent.reconcilers.migration`.
"""

from __future__ import annotations

import contextlib
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from agent.compute.xml import NS
from minicloud.pki import write_private

#: ``<data_dir>/pki/libvirt``: the TLS files of this node's libvirtd and QEMU.
TLS_SUBDIR = Path("pki") / "libvirt"
_LIBVIRT_NAMES = {"cacert.pem": "ca", "servercert.pem": "cert", "clientcert.pem": "cert", "serverkey.pem": "key",
                  "clientkey.pem": "key"}  # fmt: skip
_QEMU_NAMES = {"ca-cert.pem": "ca", "server-cert.pem": "cert", "client-cert.pem": "cert", "server-key.pem": "key",
               "client-key.pem": "key"}  # fmt: skip


# -- TLS ---------------------------------------------------------------------------------------------------------------
def tls_dir(data_path: Path) -> Path:
    return Path(data_path) / TLS_SUBDIR


def write_tls_files(data_path: Path) -> Path:
    """Copy the node's cluster CA, certificate and key (``<data_dir>/pki``) into :func:`tls_dir` under the names
    libvirt and QEMU read (keys mode 0600); files already equal are left alone. Returns the directory."""
    pki = Path(data_path) / "pki"
    src = {
        "ca": (pki / "ca.crt").read_bytes(),
        "cert": (pki / "server.crt").read_bytes(),
        "key": (pki / "server.key").read_bytes(),
    }
    out = tls_dir(data_path)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, role in {**_LIBVIRT_NAMES, **_QEMU_NAMES}.items():
        path = out / name
        data = src[role]
        with contextlib.suppress(OSError):
            if path.read_bytes() == data:
                continue
        if role == "key":
            write_private(path, data)
        else:
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    return out


def libvirtd_conf(directory: Path) -> str:
    """The ``libvirtd.conf`` lines of a node's TLS listener (run libvirtd with ``--listen``): TLS only, the client's
    certificate checked against the cluster CA."""
    return (
        'listen_tls = 1\nlisten_tcp = 0\nauth_tls = "none"\ntls_no_verify_certificate = 0\n'
        f'ca_file = "{directory}/cacert.pem"\ncert_file = "{directory}/servercert.pem"\n'
        f'key_file = "{directory}/serverkey.pem"\n'
    )


def qemu_conf(directory: Path) -> str:
    """The ``qemu.conf`` lines that make QEMU's migration and NBD streams TLS with certificates checked both ways."""
    return f'migrate_tls_x509_cert_dir = "{directory}"\nmigrate_tls_x509_verify = 1\nmigrate_tls_force = 1\n'


def dest_uri(address: str, directory: Path) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"qemu+tls://{host}/system?pkipath={directory}"


# -- the source --------------------------------------------------------------------------------------------------------
def target_xml(live_xml: str, dest_xml: str) -> str:
    """The running guest's migratable definition with what differs on the target taken from the target's own
    definition: kernel, initrd and nvram paths, each disk's file (by guest device), the serial and console files,
    each NIC's bridge (by MAC) and our metadata."""
    live = ET.fromstring(live_xml)
    dest = ET.fromstring(dest_xml)
    for tag in ("kernel", "initrd", "nvram"):
        src_el, dst_el = live.find(f"os/{tag}"), dest.find(f"os/{tag}")
        if src_el is not None and dst_el is not None:
            src_el.text = dst_el.text
    dest_disks = {
        t.get("dev"): disk.find("source")
        for disk in dest.iterfind("devices/disk")
        if (t := disk.find("target")) is not None
    }
    for disk in live.iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        want = dest_disks.get(target.get("dev")) if target is not None else None
        if source is not None and want is not None and want.get("file") and source.get("file"):
            source.set("file", want.get("file", ""))
    for tag in ("serial", "console"):
        dst_src = dest.find(f"devices/{tag}/source")
        for el in live.iterfind(f"devices/{tag}"):
            src = el.find("source")
            if src is not None and dst_src is not None and dst_src.get("path") and src.get("path"):
                src.set("path", dst_src.get("path", ""))
    bridges = {
        mac.get("address"): iface.find("source")
        for iface in dest.iterfind("devices/interface")
        if (mac := iface.find("mac")) is not None
    }
    for iface in live.iterfind("devices/interface"):
        mac, source = iface.find("mac"), iface.find("source")
        want = bridges.get(mac.get("address")) if mac is not None else None
        if source is not None and want is not None and want.get("bridge"):
            source.set("bridge", want.get("bridge", ""))
    live_meta, dest_meta = live.find("metadata"), dest.find("metadata")
    if dest_meta is not None:
        if live_meta is not None:
            live.remove(live_meta)
        live.append(dest_meta)
    ET.register_namespace("minicloud", NS)
    return ET.tostring(live, encoding="unicode")

"""``scripts/libvirt-tls``: the managed blocks install.sh writes into libvirtd.conf and qemu.conf (against a temporary
directory, ``LIBVIRT_CONF_DIR``): written once, replaced on a re-run, assignments of the same keys set aside and given
back, removed by ``disable``, nothing written while a certificate file is missing, and the lines are exactly the
agent's (:func:`agent.compute.migrate.libvirtd_conf`, :func:`~agent.compute.migrate.qemu_conf`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.compute import migrate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "libvirt-tls"
FILES = ("cacert.pem", "servercert.pem", "serverkey.pem", "clientcert.pem", "clientkey.pem", "ca-cert.pem",
         "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")  # fmt: skip


def run(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LIBVIRT_CONF_DIR": str(conf)}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)


def data_dir(root: Path) -> Path:
    tls = root / "pki" / "libvirt"
    tls.mkdir(parents=True)
    for name in FILES:
        (tls / name).write_text("pem\n")
    return root


def block(text: str) -> str:
    start = text.index("# BEGIN minicloud")
    body = text[start:].split("\n", 1)[1]
    return body[: body.index("# END minicloud\n")]


def test_the_blocks_are_written_once_replaced_and_removed(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    original = "# Debian\n#listen_tls = 0\nlisten_tls = 0\nmax_clients = 5000\n"
    (conf / "libvirtd.conf").write_text(original)
    (conf / "qemu.conf").write_text('user = "root"\nmigrate_tls_force = 0\n')
    (conf / "qemu.conf").chmod(0o600)
    a = data_dir(tmp_path / "a")
    assert run(conf, "status").returncode == 1
    first = run(conf, "enable", str(a))
    assert (first.returncode, first.stdout) == (0, "changed\n"), first.stderr
    again = run(conf, "enable", str(a))
    assert (again.returncode, again.stdout) == (0, "unchanged\n")
    libvirtd, qemu = (conf / "libvirtd.conf").read_text(), (conf / "qemu.conf").read_text()
    assert libvirtd.count("# BEGIN minicloud") == 1 and qemu.count("# BEGIN minicloud") == 1
    tls = a / "pki" / "libvirt"
    assert block(libvirtd) == migrate.libvirtd_conf(tls) and block(qemu) == migrate.qemu_conf(tls)
    # libvirt reads a key's first assignment: the operator's own is set aside, comments and other keys stay
    assert libvirtd.startswith("# Debian\n#listen_tls = 0\n#minicloud-managed# listen_tls = 0\nmax_clients = 5000\n")
    assert "#minicloud-managed# migrate_tls_force = 0\n" in qemu and qemu.startswith('user = "root"\n')
    assert oct((conf / "qemu.conf").stat().st_mode & 0o777) == "0o600"
    assert run(conf, "status").returncode == 0
    fingerprint = run(conf, "fingerprint").stdout.strip()
    assert len(fingerprint) == 64  # what start-libvirtd compares to tell a new certificate (a restart) apart
    # another data directory: the block is replaced, not added
    b = data_dir(tmp_path / "b")
    assert run(conf, "enable", str(b)).stdout == "changed\n"
    libvirtd = (conf / "libvirtd.conf").read_text()
    assert libvirtd.count("# BEGIN minicloud") == 1 and block(libvirtd) == migrate.libvirtd_conf(b / "pki" / "libvirt")
    assert libvirtd.count("#minicloud-managed# ") == 1
    # a file the block names is gone: status says so (start-libvirtd then starts no listener)
    (b / "pki" / "libvirt" / "serverkey.pem").unlink()
    assert run(conf, "status").returncode == 1 and run(conf, "fingerprint").returncode == 1
    # disable: the files as they were
    gone = run(conf, "disable")
    assert (gone.returncode, gone.stdout) == (0, "changed\n")
    assert (conf / "libvirtd.conf").read_text() == original
    assert (conf / "qemu.conf").read_text() == 'user = "root"\nmigrate_tls_force = 0\n'
    assert run(conf, "disable").stdout == "unchanged\n"
    assert sorted(p.name for p in conf.iterdir()) == ["libvirtd.conf", "qemu.conf"]  # no temporary files left


def test_nothing_is_written_while_a_certificate_file_is_missing(tmp_path):
    conf = tmp_path / "etc"
    d = data_dir(tmp_path / "d")
    (d / "pki" / "libvirt" / "clientkey.pem").unlink()
    refused = run(conf, "enable", str(d))
    assert refused.returncode == 3 and "clientkey.pem is missing" in refused.stderr
    assert not conf.exists() or not any(conf.iterdir())
    assert run(conf, "bogus").returncode == 2

"""CI's strict mode (tests/conftest.py): a skip for a component CI provides fails; a skip for hardware stays a skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = """
import pytest

def test_passes():
    pass

def test_needs_etcd():
    pytest.skip("needs etcd (Debian package etcd-server)")

@pytest.mark.skipif(True, reason="needs root, dnsmasq, nft and /bin/busybox")
def test_needs_root():
    pass

def test_needs_kvm():
    pytest.skip("libvirt reports no kvm domain type on this host")

def test_needs_a_gpu():
    pytest.skip("needs an NVIDIA GPU")

@pytest.fixture
def libvirtd():
    pytest.skip("cannot connect to qemu:///system (is libvirtd running?)")

def test_needs_libvirtd(libvirtd):
    pass

@pytest.mark.xfail(reason="known")
def test_expected_failure():
    assert False
"""

MODULE_SKIP = """
import pytest
libvirt = pytest.importorskip("no_such_module_for_minicloud", reason="libvirt-python is not installed")

def test_never_runs():
    pass
"""


def _run(tmp_path: Path, strict: str | None, *files: tuple[str, str]) -> tuple[int, str]:
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"
    )
    for name, text in files:
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("MINICLOUD_STRICT", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(ROOT)
    if strict is not None:
        env["MINICLOUD_STRICT"] = strict
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-v", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout + done.stderr


def _outcomes(output: str) -> dict[str, str]:
    """``test_name → PASSED|FAILED|SKIPPED|XFAIL|ERROR`` from the verbose report."""
    return dict(re.findall(r"::(test_\w+) (PASSED|FAILED|SKIPPED|XFAIL|ERROR)", output))


def test_without_strict_mode_skips_stay_skips(tmp_path: Path) -> None:
    rc, output = _run(tmp_path, None, ("test_sample.py", SAMPLE))
    assert rc == 0, output
    assert "1 passed, 5 skipped, 1 xfailed" in output, output


@pytest.mark.parametrize("value", ["1", "yes"])
def test_strict_mode_fails_skips_for_components_ci_provides(tmp_path: Path, value: str) -> None:
    rc, output = _run(tmp_path, value, ("test_sample.py", SAMPLE))
    assert rc == 1, output
    outcomes = _outcomes(output)
    assert outcomes["test_passes"] == "PASSED"
    assert outcomes["test_needs_etcd"] == "FAILED"
    # A skip while setting up (a skipif mark, a fixture) becomes an error of that test.
    assert outcomes["test_needs_root"] == "ERROR"
    assert outcomes["test_needs_libvirtd"] == "ERROR"
    assert outcomes["test_expected_failure"] == "XFAIL"
    assert outcomes["test_needs_kvm"] == outcomes["test_needs_a_gpu"] == "SKIPPED"  # CI has neither
    assert "MINICLOUD_STRICT=1: skipped for something CI provides: needs etcd (Debian package etcd-server)" in output


def test_strict_mode_off_when_zero(tmp_path: Path) -> None:
    rc, output = _run(tmp_path, "0", ("test_sample.py", SAMPLE))
    assert rc == 0, output


def test_strict_mode_fails_a_module_skipped_while_collecting(tmp_path: Path) -> None:
    rc, output = _run(tmp_path, "1", ("test_module_skip.py", MODULE_SKIP))
    assert rc != 0, output
    assert "skipped for something CI provides: libvirt-python is not installed" in output
    rc, output = _run(tmp_path, None)
    assert rc == pytest.ExitCode.NO_TESTS_COLLECTED and "1 skipped" in output, output


def test_every_skip_reason_in_the_suite_is_classified() -> None:
    """The suite's own skip reasons: all but the hardware ones are things CI provides (the table in the report)."""
    from tests.conftest import skip_allowed_in_strict_mode

    hardware = ["libvirt reports no kvm domain type on this host"]
    provided = [
        "needs etcd (Debian package etcd-server)",
        "needs root, dnsmasq, nft and /bin/busybox",
        "libvirt-python is not installed",
        "cannot connect to qemu:///system (is libvirtd running? scripts/start-libvirtd): x",
        "qemu-img is not installed (Debian package qemu-utils)",
        "/usr/share/OVMF/OVMF_CODE.fd or /usr/share/OVMF/OVMF_VARS.fd is missing (Debian package ovmf)",
        "qemu-system-x86_64 is not installed (Debian package qemu-system-x86)",
        "the cluster harness needs root to create network namespaces (ip netns add)",
        "building the cloud image needs root (debootstrap, chroot)",
        "needs ssh-keygen (openssh-client) to compare fingerprints",
        "blkid (util-linux) is not installed",
        "no guest kernel package could be downloaded or found in the cache: x",
    ]
    assert all(skip_allowed_in_strict_mode(r) for r in hardware)
    assert not any(skip_allowed_in_strict_mode(r) for r in provided)

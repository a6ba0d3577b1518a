"""Shared fixtures (SSH keys) and CI's strict mode.

Strict mode (``MINICLOUD_STRICT=1``, which ``.ci/run`` sets): a test that skips because something is missing fails
instead, since CI provides every component the suite needs (root, libvirtd and libvirt-python, QEMU, OVMF, etcd,
dnsmasq, nft, busybox, network namespaces, ssh-keygen, blkid, the Debian mirror for the guest kernel). Only skips for
what CI cannot provide stay skips: their reasons match :data:`NOT_PROVIDED_BY_CI` (hardware virtualisation, GPUs).
A new skip for anything else fails CI until CI provides the component or the pattern here names it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

STRICT_ENV = "MINICLOUD_STRICT"

# Skip reasons that stay skips in strict mode: hardware CI machines do not have.
NOT_PROVIDED_BY_CI = (
    re.compile(r"\bkvm\b", re.IGNORECASE),  # "libvirt reports no kvm domain type on this host"
    re.compile(r"\b(gpus?|nvidia)\b", re.IGNORECASE),
)


def make_ssh_key(comment: str = "test@minicloud") -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{pub.decode()} {comment}"


@pytest.fixture(scope="session")
def ssh_key() -> str:
    return make_ssh_key()


# -- how the suite is spread over xdist workers ------------------------------------------------------------------------

# Each test module under this directory builds a rack of agents (three nodes, guests, Ceph): they run one after the
# other on one worker, so two racks never compete for the machine's two cores, while the other worker takes the rest.
RACK_TESTS = "tests/cluster/"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """With xdist's default ``load`` (``-n auto``), schedule by module instead, every rack module in one unit.

    Plain ``load`` hands each worker a quarter of the collection at once (~500 tests, with every rack module in the
    first worker's share) and never takes back what it handed out: one worker ran its queue for ~20 minutes after the
    other went idle. Here a worker takes one unit at a time (after a first two), in collection order: the rack
    modules first, then each integration and unit module; a module never straddles two workers, so module-scoped
    fixtures are set up once. An explicit ``--dist`` other than ``load`` is left to xdist."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return RACK_TESTS if nodeid.startswith(RACK_TESTS) else nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep collection order: the long rack unit starts first
    return ModuleScheduling(config, log)  # type: ignore[arg-type]


# -- the shared Ceph cluster (tests/ceph.py) ---------------------------------------------------------------------------


def _shared_tmp(config: pytest.Config) -> Path:
    """The run's temporary directory that every xdist worker and the controller share."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return base.parent if hasattr(config, "workerinput") else base


def _made_shared_tmp(config: pytest.Config) -> Path | None:
    """The shared temporary directory if this process made one (no new directory just to look)."""
    return None if config._tmp_path_factory._basetemp is None else _shared_tmp(config)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def ceph_cluster(request: pytest.FixtureRequest):
    """The run's real Ceph cluster (one for all workers; see tests/ceph.py): a ``CephHandle``."""
    from tests import ceph

    if not ceph.ceph_installed():
        pytest.skip(ceph.SKIP_REASON)
    if os.geteuid() != 0:
        pytest.skip("Ceph's daemons need root here")
    return ceph.shared_cluster(_shared_tmp(request.config), ceph.owner_pid(request.config))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workerinput"):
        return  # the controller (or the only process) tears the shared cluster down
    from tests import ceph

    shared = _made_shared_tmp(session.config)
    if shared is not None:
        ceph.teardown_shared_cluster(shared)


# -- strict mode -----------------------------------------------------------------------------------------------------


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def skip_allowed_in_strict_mode(reason: str) -> bool:
    return any(p.search(reason) for p in NOT_PROVIDED_BY_CI)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    # A skip's longrepr is (path, line, "Skipped: reason").
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped or hasattr(report, "wasxfail") or not strict():
        return
    reason = _skip_reason(report)
    if skip_allowed_in_strict_mode(reason):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{STRICT_ENV}=1: skipped for something CI provides: {reason}\n"
        "Install or start it in CI (scripts/packages.txt, .ci/run), or, if CI cannot provide it, name it in "
        "NOT_PROVIDED_BY_CI in tests/conftest.py."
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport]:
    report = yield
    _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, pytest.CollectReport]:
    report = yield
    _fail_skip(report)  # a module-level skip (pytestmark, importorskip) happens while collecting
    return report

"""Fixtures for multi-node tests: ``make_cluster(n)`` builds agents in network namespaces (see ``harness.py``);
``real_hosts`` skips where nodes cannot run their own libvirtd and guests; ``guest_image`` is the busybox test guest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster
from tests.integration.conftest import guest_image  # noqa: F401  (the busybox test guest, built once per session)


@pytest.fixture(scope="session")
def netns_harness() -> None:
    """Skip (saying what is missing) where namespaces cannot be made; clear what crashed runs left behind."""
    reason = harness.unavailable_reason()
    if reason:
        pytest.skip(reason)
    harness.cleanup_stale_once()


@pytest.fixture
def make_cluster(netns_harness: None, tmp_path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(n=3, start=False, extra_args=(), extra_env=None)`` → a :class:`Cluster` under ``tmp_path``,
    closed (agents killed, namespaces removed) when the test ends, whatever happened."""
    clusters: list[Cluster] = []

    def make(n: int = 3, **kw: Any) -> Cluster:
        cluster = Cluster(tmp_path / f"cluster{len(clusters) + 1}", n, **kw)
        clusters.append(cluster)
        return cluster

    yield make
    errors = []
    for cluster in clusters:
        try:
            cluster.close()
        except harness.HarnessError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors))


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """Three started agents, ``n1``..``n3``."""
    return make_cluster(3, start=True)


@pytest.fixture(scope="session")
def real_hosts(netns_harness: None) -> None:
    """Skip (saying what is missing) where a test node cannot run its own libvirtd and QEMU guests."""
    reason = harness.libvirt_unavailable_reason()
    if reason:
        pytest.skip(reason)

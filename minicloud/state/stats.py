"""A distribution the store keeps of its own work (commit latency, batch sizes) without depending on a metrics
library: counts per upper bound, their sum and count, which ``agent/metrics`` exports as Prometheus histograms
(``minicloud_store_commit_duration_seconds``, ``minicloud_store_commit_batch_size``)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable


class Distribution:
    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, observations <= le), …, ("+Inf", count)]``, as a Prometheus histogram's buckets."""
        out, running = [], 0
        for bound, n in zip((*(f"{b:g}" for b in self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


#: Commit latency buckets (seconds): a group commit is one fsync (ms) on one node, an etcd round trip in a cluster.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Transactions per SQLite write (group commit).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

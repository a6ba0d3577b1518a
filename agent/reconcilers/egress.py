"""Router egress reporting: each node writes the running byte counters of its routers' external legs (the named nft
counters :mod:`agent.net.router` keeps, read by :func:`agent.net.router.read_egress`) into the router's status,
where the billing meter ``network.egress-gib`` reads them (docs/billing.md, "Router egress"). Store access lives
here, not in the driver."""

from __future__ import annotations

import time

import msgspec

from agent.net.router import RouterPlumbing, read_egress
from minicloud.state import Store, Txn, TxnFailed, Update


def egress_status(status: dict, node: str, since: int, value: int) -> dict | None:
    """Pure: a router record's ``status`` with this node's egress counter (``egress[node] = {since, bytes}``: the
    metering meter ``network.egress-gib`` reads it), or None when it holds that already."""
    egress = dict(status.get("egress") or {})
    entry = {"since": int(since), "bytes": int(value)}
    if egress.get(node) == entry:
        return None
    egress[node] = entry
    return {**status, "egress": egress}


async def report_egress(store: Store, plumbing: RouterPlumbing, node: str, read=None) -> int:
    """Write this node's egress counters into each router's status (``egress["<node>/<vni>"]``, see
    :func:`egress_status`): one ``nft`` read per service namespace with a leg, one CAS update per router whose
    figures moved (a conflict is left to the next call). Call it at most once a minute. Returns the routers written."""
    read = read or read_egress
    wrote = 0
    for path, plan in sorted(plumbing.applied().items()):
        if not plan.legs:
            continue
        counters = await read(path)
        since = plumbing.egress_since(path) if hasattr(plumbing, "egress_since") else 0
        for leg in plan.legs:
            if leg.name not in counters or not since:
                continue
            record = await store.get("router", leg.router_id)
            if record is None:
                continue
            status = egress_status(dict(record.status), f"{node}/{plan.vni}", since, counters[leg.name])
            if status is None:
                continue
            try:
                updated = msgspec.structs.replace(record, status=status)
                await store.commit(Txn([Update(updated, expect_revision=record.revision)]))
                wrote += 1
            except TxnFailed:
                pass
    return wrote


class EgressReporter:
    """:func:`report_egress` at most every ``interval`` seconds, however often :meth:`refresh` is called (the metrics
    refresh loop calls it). ``plumbing`` gives the node's router plumbing (None before the network reconciler)."""

    def __init__(self, store, plumbing, node: str, *, interval: float = 60.0, clock=time.monotonic, read=None) -> None:
        self.store, self.plumbing, self.node = store, plumbing, node
        self.interval, self.clock, self.read = interval, clock, read
        self._last: float | None = None

    async def refresh(self) -> None:
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            return
        self._last = now
        plumbing = self.plumbing()
        if plumbing is not None:
            await report_egress(self.store, plumbing, self.node, self.read)

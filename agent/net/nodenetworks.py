"""Which networks are built on this node: the one thing the network reconciler tells the compute reconciler.

``agent/node.py`` makes one :class:`NodeNetworks` and hands it to both. The network reconciler calls
:meth:`NodeNetworks.built` once a network's bridge (and whatever else a NIC needs before it is plugged: VXLAN,
service namespace) exists on this node and :meth:`NodeNetworks.gone` when it removed it; the compute reconciler asks
:meth:`NodeNetworks.bridge_for` before plugging a NIC and requeues the instance until the answer is a bridge. A
change queues the instances waiting for it (:meth:`NodeNetworks.on_change`), so they need not poll fast.

Plain in-memory state of one agent process: a restarted agent starts empty and the network reconciler's first pass
fills it again (it adopts existing devices without recreating them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable


def tap_name(port_id: str) -> str:
    """The host device (tap) of a port's NIC on its node: ``mct-`` + 10 hex digits of the port id's SHA-256 (fits
    IFNAMSIZ). The compute reconciler names the guest's tap so; the network reconciler's security-group rules match
    on it."""
    return "mct-" + hashlib.sha256(port_id.encode()).hexdigest()[:10]


class NodeNetworks:
    """network id → the Linux bridge its NICs plug into on this node."""

    def __init__(self) -> None:
        self._bridges: dict[str, str] = {}
        self._listeners: list[Callable[[str], None]] = []

    def bridge_for(self, network_id: str) -> str | None:
        """The bridge a NIC of ``network_id`` plugs into here, or None while the network is not built here."""
        return self._bridges.get(network_id)

    def built(self, network_id: str, bridge: str) -> None:
        """The network reconciler built ``network_id`` on this node (idempotent)."""
        if self._bridges.get(network_id) != bridge:
            self._bridges[network_id] = bridge
            self._notify(network_id)

    def gone(self, network_id: str) -> None:
        """The network reconciler removed ``network_id`` from this node (idempotent)."""
        if self._bridges.pop(network_id, None) is not None:
            self._notify(network_id)

    def networks(self) -> dict[str, str]:
        """A copy of what is built: network id → bridge."""
        return dict(self._bridges)

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(network_id)`` whenever a network is built or removed here."""
        self._listeners.append(listener)

    def _notify(self, network_id: str) -> None:
        for listener in self._listeners:
            listener(network_id)

"""Which networks are built on this node: the one thing the network reconciler tells the compute reconciler.

``agent/node.py`` makes one :class:`NodeNetworks` and hands it to both. The network reconciler calls
:meth:`NodeNetworks.built` once a network's bridge (and whatever else a NIC needs before it is plugged: VXLAN,
service namespace) exists on this node and :meth:`NodeNetworks.gone` when it removed it; the compute reconciler asks
:meth:`NodeNetworks.bridge_for` before plugging a NIC and requeues the instance until the answer is a bridge. A
change queues the instances waiting for it (:meth:`NodeNetworks.on_change`), so they need not poll fast.

The node's **default bridge** goes through it too: the agent names the bridge and where its guests' fixed addresses
are (:meth:`NodeNetworks.use_default_bridge`); the compute reconciler says when they changed
(:meth:`NodeNetworks.guests_changed`, which queues the network reconciler) and starts a guest only once the network
reconciler has put the anti-spoofing rules of its tap and address in the kernel (:meth:`NodeNetworks.guarded`,
reported with :meth:`NodeNetworks.set_guarded`; a change queues the waiting instances under :data:`GUARD`).

Plain in-memory state of one agent process: a restarted agent starts empty and the network reconciler's first pass
fills it again (it adopts existing devices without recreating them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

#: The key under which instances wait for their anti-spoofing rules (:meth:`NodeNetworks.on_change` listeners get it
#: when :meth:`NodeNetworks.set_guarded` changes what is guarded). No network id looks like it.
GUARD = ":guard"


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
        #: The default bridge, and MAC -> fixed address of its guests (None: no default bridge on this node).
        self.default_bridge: str | None = None
        self._addresses: Callable[[], Mapping[str, str]] = dict
        self._guests_listeners: list[Callable[[], None]] = []
        self._guarded: dict[str, tuple[str, ...]] = {}
        self._failed: dict[str, str] = {}
        self._landed: dict[str, str] = {}
        self._landed_listeners: list[Callable[[str], None]] = []

    # -- the default bridge's guests ---------------------------------------------------------------------------------
    def use_default_bridge(self, bridge: str, addresses: Callable[[], Mapping[str, str]]) -> None:
        """The node has a default bridge ``bridge``; ``addresses()`` gives its guests' fixed addresses (MAC -> IPv4)."""
        self.default_bridge, self._addresses = bridge, addresses

    def default_addresses(self) -> Mapping[str, str]:
        """MAC -> fixed address of the default bridge's guests (empty without a default bridge)."""
        return self._addresses() if self.default_bridge is not None else {}

    def guests_changed(self) -> None:
        """The default bridge's guests or their addresses changed (the compute reconciler says so)."""
        for listener in self._guests_listeners:
            listener()

    def on_guests_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` on :meth:`guests_changed` (the network reconciler queues its ruleset)."""
        self._guests_listeners.append(listener)

    @property
    def guarding(self) -> bool:
        """Whether something puts the default bridge's guests' rules in place (a listener of :meth:`guests_changed`):
        without it nobody would ever report them guarded, and nobody waits."""
        return self.default_bridge is not None and bool(self._guests_listeners)

    def set_guarded(self, taps: Mapping[str, tuple[str, ...]]) -> None:
        """The anti-spoofing rules now in the kernel for the default bridge's guests: tap -> the addresses it may
        send from. A change queues the instances waiting under :data:`GUARD`."""
        if dict(taps) != self._guarded:
            self._guarded = dict(taps)
            self._notify(GUARD)

    def guarded(self, tap: str, ip: str) -> bool:
        """Whether the kernel pins ``tap`` to ``ip`` (a guest may be started)."""
        return self._guarded.get(tap) == (ip,)

    # -- guests arriving by live migration --------------------------------------------------------------------------
    def landed(self, ports: Mapping[str, str]) -> None:
        """A guest arriving by live migration runs here now, ahead of its record (the compute reconciler sees its
        domain resume): ``ports`` port id -> network id of its NICs. The network reconciler then takes over their
        floating IPs at once (leg, DNAT, gratuitous ARP) instead of when the migration's last transaction lands."""
        new = {pid: nid for pid, nid in ports.items() if pid not in self._landed}
        self._landed.update(ports)
        for nid in sorted(set(new.values())):
            for listener in self._landed_listeners:
                listener(nid)

    def is_landed(self, port_id: str) -> bool:
        return port_id in self._landed

    def forget_landed(self, port_id: str) -> None:
        """The port's record caught up (moved here, or the migration ended otherwise)."""
        self._landed.pop(port_id, None)

    def on_landed(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(network_id)`` when a NIC of that network has landed here (:meth:`landed`)."""
        self._landed_listeners.append(listener)

    def failed(self, network_id: str, reason: str) -> None:
        """The network reconciler cannot build ``network_id`` here for a reason only the operator or the user can
        change (an external network whose provider is missing or not a bridge on this node): its instances fail
        their build with ``reason`` instead of waiting. Cleared by :meth:`built` and :meth:`gone`."""
        if self._failed.get(network_id) != reason:
            self._failed[network_id] = reason
            self._notify(network_id)

    def failure(self, network_id: str) -> str | None:
        """Why ``network_id`` cannot be built on this node (None: nothing known against it)."""
        return self._failed.get(network_id)

    def bridge_for(self, network_id: str) -> str | None:
        """The bridge a NIC of ``network_id`` plugs into here, or None while the network is not built here."""
        return self._bridges.get(network_id)

    def built(self, network_id: str, bridge: str) -> None:
        """The network reconciler built ``network_id`` on this node (idempotent)."""
        self._failed.pop(network_id, None)
        if self._bridges.get(network_id) != bridge:
            self._bridges[network_id] = bridge
            self._notify(network_id)

    def gone(self, network_id: str) -> None:
        """The network reconciler removed ``network_id`` from this node (idempotent)."""
        self._failed.pop(network_id, None)
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

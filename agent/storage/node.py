"""What storage this node can use right now: the one thing the storage reconciler tells the compute reconciler.

``agent/node.py`` makes one :class:`NodeStorage` and hands it to both (like
:class:`~agent.net.nodenetworks.NodeNetworks`). The storage reconciler publishes a pool's
:class:`~agent.storage.driver.VolumeDriver` once the pool is usable here (:meth:`NodeStorage.publish`; for a ``ceph``
pool: the engine runs on this node and the ``client.minicloud`` key is installed) and withdraws it when it is not
(:meth:`NodeStorage.withdraw`); it publishes the cephx secret libvirt needs for RBD disks
(:meth:`NodeStorage.set_ceph_secret`) *before* any ``ceph`` pool's driver, so a caller that got a ceph driver also
gets the secret. The compute reconciler asks :meth:`NodeStorage.driver` before it builds a disk from a pool and
requeues the instance until the answer is a driver; a change calls the listeners (:meth:`NodeStorage.on_change`),
so waiting instances need not poll fast.

Plain in-memory state of one agent process: a restarted agent starts empty and the storage reconciler's first pass
fills it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.storage.driver import VolumeDriver

log = logging.getLogger("minicloud.storage.node")


@dataclass(frozen=True)
class CephSecret:
    """The cephx key guests use for RBD disks, as a libvirt ``<secret ephemeral='no' private='yes'>`` needs it:
    ``uuid`` (what :attr:`~agent.storage.driver.DiskSource.secret_uuid` names), ``usage`` (the ``<usage
    type='ceph'><name>``), ``key`` (the raw key bytes: ``virSecretSetValue`` takes them, not the base64 text).
    Never logged: ``repr`` hides the key."""

    uuid: str
    usage: str
    key: bytes
    #: The cephx user (``minicloud`` for ``client.minicloud``).
    user: str = "minicloud"

    def __repr__(self) -> str:
        return f"CephSecret(uuid={self.uuid!r}, usage={self.usage!r}, user={self.user!r}, key=<hidden>)"

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Unpacks as ``uuid, usage, key``."""
        return iter((self.uuid, self.usage, self.key))


class NodeStorage:
    """pool id → the driver that reaches it from this node, and the cephx secret for RBD disks."""

    def __init__(self) -> None:
        self._drivers: dict[str, VolumeDriver] = {}
        self._secret: CephSecret | None = None
        self._listeners: list[Callable[[str], None]] = []
        self._guests_checked = False

    # -- readers (the compute reconciler) -------------------------------------------------------------------------
    def driver(self, pool_id: str) -> VolumeDriver | None:
        """The driver of pool ``pool_id`` on this node, or None while the pool is not usable here (not reconciled
        yet, the Ceph cluster not running here, a local pool's directory unusable)."""
        return self._drivers.get(pool_id)

    def ceph_secret(self) -> CephSecret | None:
        """The cephx secret for RBD disks (unpacks as ``uuid, usage, key``), or None while this node has no Ceph
        keys. Define it in libvirt before a domain that has an RBD disk (``DiskSource.secret_uuid`` names it)."""
        return self._secret

    def pools(self) -> dict[str, VolumeDriver]:
        """A copy of what is usable: pool id → driver."""
        return dict(self._drivers)

    @property
    def guests_checked(self) -> bool:
        """Whether this agent's compute reconciler has swept the node's domains since it started (those of
        instances placed elsewhere, or deleted, are destroyed): no guest of a moved instance is left here. The
        storage reconciler lifts this node's fence only then."""
        return self._guests_checked

    def set_guests_checked(self) -> None:
        """Called by the compute reconciler once its first sweep of the node's domains is done."""
        self._guests_checked = True

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(pool_id)`` whenever a pool's driver is published, replaced or withdrawn here (and, with
        every ceph pool's id, when the ceph secret changes). Listeners run on the event loop and must not block."""
        self._listeners.append(listener)

    # -- writers (the storage reconciler) --------------------------------------------------------------------------
    def publish(self, pool_id: str, driver: VolumeDriver) -> None:
        """``pool_id`` is usable here through ``driver`` (idempotent for the same driver object)."""
        if self._drivers.get(pool_id) is not driver:
            self._drivers[pool_id] = driver
            self._notify(pool_id)

    def withdraw(self, pool_id: str) -> None:
        """``pool_id`` is no longer usable here (idempotent)."""
        if self._drivers.pop(pool_id, None) is not None:
            self._notify(pool_id)

    def set_ceph_secret(self, secret: CephSecret | None) -> None:
        """Publish (or, None, withdraw) the cephx secret; the ceph pools' listeners are told when it changes."""
        if secret == self._secret:
            return
        self._secret = secret
        for pool_id, drv in list(self._drivers.items()):
            if drv.name == "ceph":
                self._notify(pool_id)

    def _notify(self, pool_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(pool_id)
            except Exception:
                log.exception("a storage listener failed", extra={"pool": pool_id})

"""SDK for floating IPs: ``client.floating_ips`` (list, get, update from the kind; allocate, associate,
disassociate, release here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minicloud.client.collection import Collection, quote
from minicloud.model.floating_ip import FloatingIp
from minicloud.network.kinds import FLOATING_IP

if TYPE_CHECKING:
    from minicloud.client import Client


class FloatingIps(Collection[FloatingIp]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, FLOATING_IP)

    def allocate(self, *, network: str, idempotency_key: str | None = None, **fields: Any) -> FloatingIp:
        """An address of external network ``network``'s pool; ``description=``, ``labels=`` optional."""
        return self._create({"network": network, **fields}, idempotency_key)

    def associate(self, ref: str, instance: str, nic: str | None = None) -> FloatingIp:
        body = {"instance": instance, **({"nic": nic} if nic else {})}
        return self._c.call("POST", f"{self.path}/{quote(ref)}/associate", FloatingIp, json=body)

    def disassociate(self, ref: str) -> FloatingIp:
        return self._c.call("POST", f"{self.path}/{quote(ref)}/disassociate", FloatingIp)

    def release(self, ref: str) -> None:
        self.delete(ref)

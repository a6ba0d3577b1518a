"""SDK for GPUs: ``client.gpus`` (list and show; cluster administrators)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from minicloud.client.collection import Collection
from minicloud.gpu.kinds import GPU
from minicloud.model.gpu import Gpu

if TYPE_CHECKING:
    from minicloud.client import Client


class Gpus(Collection[Gpu]):
    """Every node's GPUs as their agents publish them (``list(name=...)``, ``get(ref)``: id or ``NODE:PCI``)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, GPU)

"""``/v1/gpus``: list and show the GPUs every node publishes (generic verbs; ``admin:gpus:list|get``, cluster
administrators only). Nodes write the records themselves (:mod:`agent.reconcilers.gpu`); instances hold GPUs through
placement (:mod:`minicloud.compute.instances`)."""

from __future__ import annotations

from minicloud.api import generic
from minicloud.api.routing import Routes
from minicloud.gpu.kinds import GPU

routes = Routes("gpus")
generic.add_crud_routes(routes, GPU)

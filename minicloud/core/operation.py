"""The ``operation`` kind: long-running work (``202 Accepted`` answers point to one). Declared here, apart from the
runner (:mod:`minicloud.operations`), so that the SDK and the CLI read the declaration without the server's packages."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model import Operation, Problem, Progress

OperationState = Literal["running", "succeeded", "failed"]
#: The states of an operation that has ended (its record no longer changes).
FINISHED: frozenset[str] = frozenset({"succeeded", "failed"})


class OperationSpec(msgspec.Struct, kw_only=True):
    #: What runs (``admin:backup``, ``compute:images:import`` …).
    action: str = ""
    #: What it works on (kind, id, name).
    target: dict[str, str] = {}
    #: The node running it (its agent's task does the work).
    node: str = ""


class OperationStatus(msgspec.Struct, kw_only=True):
    state: OperationState = "running"
    progress: Progress = msgspec.field(default_factory=lambda: Progress(message="queued"))
    result: dict[str, Any] | None = None
    error: Problem | None = None


def _render(obj: Obj[OperationSpec, OperationStatus]) -> Operation:
    return Operation(
        **obj.common_fields(),
        action=obj.spec.action,
        target=obj.spec.target,
        node=obj.spec.node,
        state=obj.status.state,
        progress=obj.status.progress,
        result=obj.status.result,
        error=obj.status.error,
    )


#: Listing filters by state and showing can wait for the end, so the API writes those two by hand; deleting refuses
#: a running operation. No generic verb is derived.
OPERATION = declare(
    Kind(
        name="operation",
        plural="operations",
        prefix="op",
        spec=OperationSpec,
        status=OperationStatus,
        action="operations",
        view=Operation,
        render=_render,
        noun="operation",
        columns=(
            Column("id", "id"),
            Column("action", "action"),
            Column("state", "state"),
            Column("progress", "progress.message"),
            Column("node", "node"),
            Column("created", "created_at"),
        ),
        generic=frozenset(),
    )
)

"""Long-running work as ``operation`` records.

A service that cannot finish quickly calls :meth:`Operations.start`: it commits the operation through the write layer
(its idempotency key and audit entry in the same transaction), starts the work and answers ``202`` with the new
operation; the work runs as a task on this node and writes its progress and outcome into the record through the
store's normal write path, so ``GET /v1/operations/{id}``, ``?wait=`` and the events stream all see it. An agent that
restarts marks the operations it was running as failed (their tasks died with it) instead of leaving them running.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.core.context import Context
from minicloud.core.operation import FINISHED, OPERATION, OperationSpec, OperationStatus
from minicloud.core.write import Written, commit
from minicloud.model import Problem, Progress
from minicloud.state import Create, Record, Store, Txn, TxnFailed, Update

KIND = OPERATION.name
__all__ = ["FINISHED", "KIND", "Operations", "Reporter", "finished_before"]
log = logging.getLogger(__name__)


def finished_before(record: Record, now: _dt.datetime, retention: _dt.timedelta) -> bool:
    """Pure: True if the operation ``record`` ended more than ``retention`` before ``now`` (the retention loop deletes
    it). A running operation is never expired, however old."""
    if OPERATION.load(record).status.state not in FINISHED:
        return False
    return ids.parse_time(record.updated_at) <= now - retention


class Reporter:
    """Handed to the work function: ``await report(done, total, message)`` records progress."""

    def __init__(self, ops: Operations, op_id: str) -> None:
        self._ops = ops
        self._id = op_id

    async def __call__(self, done: int, total: int, message: str = "") -> None:
        await self._ops._update(self._id, progress=Progress(done=done, total=total, message=message))


Work = Callable[[Reporter], Awaitable[dict[str, Any]]]


class Operations:
    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def new_id() -> str:
        return ids.new_id(OPERATION.prefix)

    def new_record(self, action: str, target: dict[str, str], project: str, op_id: str | None = None) -> Record:
        """A new running operation of this node (named by its id), for the caller to commit with its request."""
        op_id = op_id or self.new_id()
        obj = OPERATION.new(
            project=project,
            name=op_id,
            id=op_id,
            spec=OperationSpec(action=action, target=target, node=self.node),
            status=OperationStatus(),
        )
        return OPERATION.dump(obj)

    async def start(
        self,
        ctx: Context,
        action: str,
        target: dict[str, str],
        work: Callable[[Record], Work],
        *,
        label: str = "operation",
        op_id: str | None = None,
    ) -> Written:
        """Commit a new operation through the write layer (its audit entry and ``ctx``'s Idempotency-Key in the same
        transaction) and start ``work(record)`` on this node. A retried request gets the first answer (``replayed``)
        and starts nothing. Answers 202 with the operation and its Location."""
        record = self.new_record(action, target, ctx.project, op_id)
        written = await commit(
            ctx,
            self.store,
            [Create(record)],
            status=202,
            label=label,
            respond=lambda rev: OPERATION.view_record(msgspec.structs.replace(record, revision=rev)),
        )
        if not written.replayed:
            written.headers["Location"] = f"/v1/operations/{record.id}"
            self.run(record, work(record))
        return written

    @property
    def running(self) -> int:
        """How many operations this node runs now (``minicloud_operations{state="running"}``)."""
        return len(self._tasks)

    def run(self, record: Record, work: Work) -> None:
        """Run ``work`` for an operation record that has been committed."""
        task = asyncio.create_task(self._run(record.id, work), name=f"operation {record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, op_id: str, work: Work) -> None:
        try:
            result = await work(Reporter(self, op_id))
        except asyncio.CancelledError:
            await asyncio.shield(
                self._finish(op_id, error=errors.Unavailable("the agent stopped during the operation"))
            )
            raise
        except errors.MinicloudError as exc:
            await self._finish(op_id, error=exc)
        except Exception as exc:
            log.exception("operation failed", extra={"operation": op_id})
            await self._finish(
                op_id, error=errors.MinicloudError(f"internal error: {type(exc).__name__}; see the agent log")
            )
        else:
            await self._finish(op_id, result=result)

    async def _finish(
        self, op_id: str, *, result: dict[str, Any] | None = None, error: errors.MinicloudError | None = None
    ) -> None:
        if error is not None:
            problem = msgspec.convert(error.to_problem(), Problem)
            await self._update(op_id, state="failed", error=problem)
        else:
            await self._update(op_id, state="succeeded", result=result or {})

    async def _update(self, op_id: str, **changes: Any) -> None:
        for _ in range(10):
            record = await self.store.get(KIND, op_id)
            if record is None:
                return
            obj = OPERATION.load(record)
            updated = obj.replace(status=msgspec.structs.replace(obj.status, **changes), updated_at=ids.now())
            try:
                await self.store.commit(Txn([Update(OPERATION.dump(updated), expect_revision=record.revision)]))
                return
            except TxnFailed:
                continue

    async def recover(self) -> int:
        """Mark operations this node was running when it last stopped as failed. Returns how many."""
        count = 0
        after = None
        while True:
            page = await self.store.list(KIND, where={"node": self.node}, after=after, limit=500)  # indexed
            for record in page:
                op = OPERATION.load(record)
                if op.spec.node == self.node and op.status.state == "running":
                    await self._finish(
                        record.id,
                        error=errors.Unavailable("the agent restarted before the operation finished; retry it"),
                    )
                    count += 1
            if len(page) < 500:
                return count
            after = (page[-1].name, page[-1].id)

    async def wait(self, op_id: str, seconds: float) -> Record | None:
        """The operation once it is no longer running, or as it is when ``seconds`` pass."""
        sub = self.store.subscribe()
        try:
            record = await self.store.get(KIND, op_id)
            if record is None or OPERATION.load(record).status.state != "running" or seconds <= 0:
                return record
            async with asyncio.timeout(seconds):
                async for change in sub:
                    if change.id == op_id:
                        if change.type == "deleted":
                            return None
                        if OPERATION.load(change.record).status.state != "running":
                            return change.record
        except TimeoutError:
            pass
        finally:
            sub.close()
        return await self.store.get(KIND, op_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

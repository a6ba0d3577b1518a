"""Leader loops: cluster-wide duties run as reconcile cycles on the services leader only (Patroni's ``run_cycle``).

A duty is a :class:`LeaderLoop`: a ``name``, an ``interval`` and three steps per cycle:

1. ``snapshot()`` — async, reads only: what the store holds now, as an immutable value;
2. ``decide(snapshot, now) -> plan`` — a **pure** function (no I/O, no clock of its own), unit-tested on its own;
   a plan that is falsy means "nothing to do";
3. ``act(plan) -> Outcome`` — async, the writes, through the store's normal commit path.

:class:`LeaderLoops` runs every registered loop, each as its own task, while ``is_leader()`` says this node holds
the services leadership (a single node always does). It logs **one status line per cycle** at ``info`` (``leader
cycle``: loop, what was decided, what was done, how long it took), like Patroni's "no action. I am the leader".

Guarantees:

- **Non-leaders never act.** ``is_leader()`` is checked, with the leadership *term* the cycle started in, right
  before ``act``; a plan made under an earlier term is dropped.
- **Clean hand-over.** When this node loses the leadership, the running loops are cancelled and awaited (a cycle in
  progress is cancelled, an ``act`` between two commits stops there) before anything else happens. When it gains the
  leadership, its loops wait ``settle`` seconds (in a cluster: the leadership lease's TTL, by which time the previous
  holder has lost its lease and cancelled its own loops) before their first cycle. Acts should still be safe to
  repeat (compare-and-swap deletes): a partitioned former leader cannot commit anyway, but nothing relies on that.
- **A loop never dies.** Any exception in a cycle is logged with its traceback and the cycle runs again after the
  loop's interval; only cancellation ends a loop.
- ``Outcome.more`` asks for the next cycle after ``busy_interval`` instead of ``interval``, so a backlog (more to
  delete than one cycle's bound) drains quickly without any single cycle being unbounded.

The app registers its loops in one place (``minicloud.retention.leader_loops``), and ``LeaderLoops`` is one cleanup
context of the app.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as _dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger("minicloud.leader")

S = TypeVar("S")
P = TypeVar("P")


@dataclass(frozen=True)
class Outcome:
    """What ``act`` did, for the status line. ``more``: work remains, run the next cycle soon."""

    summary: str
    more: bool = False


class LeaderLoop(abc.ABC, Generic[S, P]):
    """One leader duty. Subclasses set ``name`` and ``interval`` and implement the three steps."""

    name: str = ""
    interval: float = 60.0
    #: Seconds to the next cycle when ``act`` reported ``more`` (a backlog).
    busy_interval: float = 1.0

    @abc.abstractmethod
    async def snapshot(self) -> S:
        """Read what ``decide`` needs. Reads only; bounded (paged, indexed reads)."""

    @abc.abstractmethod
    def decide(self, snapshot: S, now: _dt.datetime) -> P:
        """Pure: the plan for ``snapshot`` at ``now``. Falsy when there is nothing to do."""

    @abc.abstractmethod
    async def act(self, plan: P) -> Outcome:
        """Carry out ``plan`` through the store. Must be safe to repeat and bounded."""

    def describe(self, plan: P) -> str:
        """The plan in a few words, for the status line."""
        return str(plan)


class Leadership(Protocol):
    """What :func:`services_leadership` adapts (``ClusterNode``)."""

    @property
    def enabled(self) -> bool: ...

    is_leader: bool


def services_leadership(node: Leadership) -> Callable[[], bool]:
    """``is_leader`` for :class:`LeaderLoops` from a cluster node: a single node always leads; in a cluster, the
    holder of the ``cluster-services`` leadership does."""
    return lambda: not node.enabled or node.is_leader


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class LeaderLoops:
    """Runs the registered loops while ``is_leader()`` is true; see the module docstring for the guarantees.

    ``poll``: how often leadership is checked; ``settle``: seconds (or a function returning them) a newly gained
    leadership waits before the first cycle; ``clock``: ``now`` handed to ``decide`` (tests pass their own)."""

    def __init__(
        self,
        is_leader: Callable[[], bool],
        *,
        poll: float = 0.5,
        settle: float | Callable[[], float] = 0.0,
        clock: Callable[[], _dt.datetime] = _utcnow,
    ) -> None:
        self._is_leader = is_leader
        self.poll = poll
        self._settle = settle
        self._clock = clock
        self.loops: dict[str, LeaderLoop[Any, Any]] = {}
        #: Counts the leaderships this node has gained; a cycle acts only in the term it started in.
        self.term = 0
        self._leading = False
        #: Set while the loops of a lost leadership are being cancelled: no act may start.
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._supervisor: asyncio.Task[None] | None = None

    def register(self, *loops: LeaderLoop[Any, Any]) -> None:
        for loop in loops:
            if not loop.name or loop.name in self.loops:
                raise ValueError(f"leader loop name {loop.name!r} is empty or taken")
            self.loops[loop.name] = loop

    @property
    def leading(self) -> bool:
        """True while this node runs its leader loops."""
        return self._leading

    def still_leader(self, term: int) -> bool:
        """True if this node leads now, in the same leadership as ``term`` (checked right before every act)."""
        return self._leading and not self._stopping and term == self.term and self._is_leader()

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="leader-loops")

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._stop_loops()

    async def _supervise(self) -> None:
        while True:
            try:
                leading = self._is_leader()
            except Exception:
                log.exception("could not tell whether this node leads; assuming it does not")
                leading = False
            if leading and not self._leading:
                self.term += 1
                self._leading = True
                settle = self._settle() if callable(self._settle) else self._settle
                log.info("leader loops start", extra={"term": self.term, "loops": list(self.loops), "settle_s": settle})
                self._tasks = [
                    asyncio.create_task(self._run(loop, self.term, settle), name=f"leader-loop {loop.name}")
                    for loop in self.loops.values()
                ]
            elif not leading and self._leading:
                await self._stop_loops()
                log.info("leader loops stopped: this node no longer leads", extra={"term": self.term})
            await asyncio.sleep(self.poll)

    async def _stop_loops(self) -> None:
        # No act may start from here on (still_leader), but ``leading`` turns False only once every loop has been
        # cancelled and awaited: whoever sees it False knows the hand-over is complete.
        self._stopping = True
        try:
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._leading = False
            self._stopping = False

    async def _run(self, loop: LeaderLoop[Any, Any], term: int, settle: float) -> None:
        await asyncio.sleep(settle)
        while True:
            outcome = await self.run_cycle(loop, term)
            await asyncio.sleep(loop.busy_interval if outcome is not None and outcome.more else loop.interval)

    # -- one cycle -------------------------------------------------------------------------------------------------
    async def run_cycle(self, loop: LeaderLoop[Any, Any], term: int | None = None) -> Outcome | None:
        """One cycle of ``loop`` in leadership ``term`` (default: the current one). Returns what ``act`` did, or None
        when nothing was done (nothing to do, not the leader, or an error — which is logged, never raised)."""
        term = self.term if term is None else term
        started = time.monotonic()
        decided = ""
        try:
            snapshot = await loop.snapshot()
            plan = loop.decide(snapshot, self._clock())
            decided = loop.describe(plan) if plan else "nothing to do"
            if not plan:
                self._status(logging.INFO, loop, decided, "nothing", started)
                return None
            if not self.still_leader(term):
                self._status(logging.INFO, loop, decided, "nothing: no longer the leader, plan dropped", started)
                return None
            outcome = await loop.act(plan)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "leader cycle failed; retrying next interval",
                extra={"loop": loop.name, "decided": decided, "retry_s": loop.interval},
            )
            return None
        self._status(logging.INFO, loop, decided, outcome.summary, started, more=outcome.more)
        return outcome

    async def run_once(self, name: str) -> Outcome | None:
        """Run one cycle of the loop called ``name`` now, in the current term (tests, and an operator's nudge)."""
        return await self.run_cycle(self.loops[name])

    @staticmethod
    def _status(
        level: int, loop: LeaderLoop[Any, Any], decided: str, did: str, started: float, *, more: bool = False
    ) -> None:
        log.log(
            level,
            "leader cycle",
            extra={
                "loop": loop.name,
                "decided": decided,
                "did": did,
                "more": more,
                "ms": round((time.monotonic() - started) * 1000, 1),
            },
        )


def chunks(items: Iterable[Any], size: int) -> list[list[Any]]:
    """``items`` in lists of at most ``size`` (one store transaction each)."""
    out: list[list[Any]] = []
    for item in items:
        if not out or len(out[-1]) >= size:
            out.append([])
        out[-1].append(item)
    return out

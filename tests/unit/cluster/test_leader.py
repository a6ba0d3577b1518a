"""The leader-loop framework: only the leader acts, errors never end a loop, leadership changes hand over cleanly."""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging

import pytest

from minicloud.cluster.leader import LeaderLoop, LeaderLoops, Outcome, chunks, services_leadership

NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.UTC)
WAIT = 10  # seconds a test waits for something that should happen at once (never the thing asserted)


class Recorder(LeaderLoop[int, int]):
    """Snapshot: a counter; decide: the counter itself (0 = nothing to do); act: records the plan."""

    name = "recorder"
    interval = 0.0

    def __init__(self, value: int = 1) -> None:
        self.value = value
        self.snapshots = 0
        self.acted: list[int] = []
        self.acted_event = asyncio.Event()
        self.fail_snapshots = 0
        self.block: asyncio.Event | None = None
        self.cancelled = False
        self.on_snapshot = lambda: None

    async def snapshot(self) -> int:
        self.snapshots += 1
        self.on_snapshot()
        if self.fail_snapshots:
            self.fail_snapshots -= 1
            raise RuntimeError("store unavailable")
        return self.value

    def decide(self, snapshot: int, now: _dt.datetime) -> int:
        return snapshot

    async def act(self, plan: int) -> Outcome:
        self.acted.append(plan)
        self.acted_event.set()
        if self.block is not None:
            try:
                await self.block.wait()
            except asyncio.CancelledError:
                self.cancelled = True
                raise
        return Outcome(f"did {plan}")


class Flag:
    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self) -> bool:
        return self.value


async def leading(is_leader, *loops_: LeaderLoop, **kw) -> LeaderLoops:
    """Started loops that lead (term 1) but whose own cycles wait an hour: the test runs cycles itself."""
    loops = LeaderLoops(is_leader, poll=0.001, settle=3600.0, **kw)
    loops.register(*loops_)
    await loops.start()
    await until(lambda: loops.leading, "leadership noticed")
    return loops


async def until(condition, what: str) -> None:
    for _ in range(int(WAIT / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"never happened: {what}")


async def test_a_non_leader_never_acts():
    loop = Recorder()
    loops = LeaderLoops(Flag(False), clock=lambda: NOW)
    loops.register(loop)
    assert await loops.run_cycle(loop) is None
    assert loop.acted == [] and loop.snapshots == 1


async def test_a_non_leaders_supervisor_starts_no_loop():
    loop = Recorder()
    loops = LeaderLoops(Flag(False), poll=0.001)
    loops.register(loop)
    await loops.start()
    try:
        for _ in range(20):
            await asyncio.sleep(0.002)
        assert not loops.leading and loop.snapshots == 0 and loop.acted == []
    finally:
        await loops.close()


async def test_the_leader_acts_on_the_plan_with_the_clock_it_was_given():
    seen = []

    class Clocked(Recorder):
        def decide(self, snapshot: int, now: _dt.datetime) -> int:
            seen.append(now)
            return snapshot

    loop = Clocked(7)
    loops = await leading(Flag(True), loop, clock=lambda: NOW)
    try:
        outcome = await loops.run_cycle(loop)
    finally:
        await loops.close()
    assert outcome == Outcome("did 7") and loop.acted == [7] and seen == [NOW]


async def test_nothing_to_do_does_not_act():
    loop = Recorder(0)
    loops = LeaderLoops(Flag(True))
    loops.register(loop)
    await loops.start()
    try:
        await until(lambda: loop.snapshots >= 3, "three cycles")
        assert loop.acted == []
    finally:
        await loops.close()


async def test_a_plan_made_before_leadership_was_lost_is_dropped():
    leader = Flag(True)
    loop = Recorder()
    loops = await leading(leader, loop)
    loop.on_snapshot = lambda: setattr(leader, "value", False)  # lost between snapshot and act
    try:
        assert await loops.run_cycle(loop) is None and loop.acted == []
    finally:
        await loops.close()


async def test_a_plan_from_an_earlier_term_is_dropped():
    leader = Flag(True)
    loop = Recorder()
    loops = await leading(leader, loop)
    try:
        leader.value = False
        await until(lambda: not loops.leading, "leadership loss noticed")
        leader.value = True
        await until(lambda: loops.term == 2, "leadership regained")
        assert await loops.run_cycle(loop, term=1) is None and loop.acted == []
        assert await loops.run_cycle(loop, term=2) is not None and loop.acted == [1]
    finally:
        await loops.close()


async def test_a_failing_cycle_is_logged_and_the_loop_runs_again(caplog):
    loop = Recorder()
    loop.fail_snapshots = 2
    loops = LeaderLoops(Flag(True), poll=0.001)
    loops.register(loop)
    with caplog.at_level(logging.INFO, logger="minicloud.leader"):
        await loops.start()
        try:
            await asyncio.wait_for(loop.acted_event.wait(), WAIT)
        finally:
            await loops.close()
    failures = [r for r in caplog.records if r.getMessage().startswith("leader cycle failed")]
    assert len(failures) == 2 and failures[0].exc_info is not None
    assert loop.acted and loop.snapshots >= 3
    status = [r for r in caplog.records if r.getMessage() == "leader cycle"]
    assert status and status[0].loop == "recorder" and status[0].did == "did 1"


async def test_losing_leadership_cancels_the_cycle_in_progress_before_a_new_term_acts():
    leader = Flag(True)
    loop = Recorder()
    loop.block = asyncio.Event()  # act never finishes by itself
    loops = LeaderLoops(leader, poll=0.001)
    loops.register(loop)
    await loops.start()
    try:
        await asyncio.wait_for(loop.acted_event.wait(), WAIT)
        assert loops.term == 1
        leader.value = False
        await until(lambda: not loops.leading, "loops stopped")
        assert loop.cancelled  # the cycle in progress was cancelled and awaited when the leadership went
        loop.acted_event.clear()
        loop.block = None
        leader.value = True
        await asyncio.wait_for(loop.acted_event.wait(), WAIT)
        assert loops.term == 2
    finally:
        await loops.close()


async def test_a_new_leadership_waits_the_settle_time_before_its_first_cycle():
    loop = Recorder()
    loops = await leading(Flag(True), loop)
    try:
        for _ in range(20):
            await asyncio.sleep(0.002)
        assert loop.snapshots == 0
    finally:
        await loops.close()


def test_services_leadership_is_always_true_on_a_single_node():
    class Node:
        enabled = False
        is_leader = False

    node = Node()
    assert services_leadership(node)() is True
    node.enabled = True
    assert services_leadership(node)() is False
    node.is_leader = True
    assert services_leadership(node)() is True


def test_loop_names_are_unique():
    loops = LeaderLoops(Flag(True))
    loops.register(Recorder())
    with pytest.raises(ValueError):
        loops.register(Recorder())


def test_chunks():
    assert chunks(range(5), 2) == [[0, 1], [2, 3], [4]]
    assert chunks([], 3) == []


async def test_every_cycle_logs_exactly_one_status_line(caplog):
    loop = Recorder(0)
    loops = await leading(Flag(True), loop)
    try:
        with caplog.at_level(logging.INFO, logger="minicloud.leader"):
            await loops.run_cycle(loop)
            loop.value = 3
            await loops.run_cycle(loop)
    finally:
        await loops.close()
    lines = [(r.decided, r.did) for r in caplog.records if r.getMessage() == "leader cycle"]
    assert lines == [("nothing to do", "nothing"), ("3", "did 3")]

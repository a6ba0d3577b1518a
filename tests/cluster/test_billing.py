"""Billing across leader kills, with real processes: a metering leader (the ``billing:meter`` and ``billing:close``
loops, in a process of its own) is SIGKILLed in the middle of its work again and again, a new one takes over each
time, and the usage records and ledger charges come out exactly as one uninterrupted leader makes them: no gap, no
duplicate, every figure the same, the hash chain intact.

The leaders run against a copy of one SQLite store (the same transactions the agents commit through etcd) with a
fixed clock, so the only difference between the runs is where the kills land. A kill is sent once the leader has
reported a number of committed cycles (never after a delay), so it always lands while work remains.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600)]
START = _dt.datetime(2026, 11, 3, 10, tzinfo=_dt.UTC)
INSTANCES = 60
HOURS = 5


def _text(t: _dt.datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _seed(db: Path) -> None:
    """Running instances from 10:00, a third stopped at 12:30, a price: the change log the leaders fold."""
    from minicloud.billing import prices
    from minicloud.core.context import Context
    from minicloud.model.billing import PriceSet
    from minicloud.state import Create, Record, SQLiteStore, Txn, Update

    s = SQLiteStore(db, retain_changes=100_000)
    await s.open()
    try:
        await prices.set_price(Context.system("t"), s, PriceSet(meter="compute.vcpu-hour", amount="0.004",
                               effective="2026-11-01"), currency="EUR", now=_dt.datetime(2026, 10, 1, tzinfo=_dt.UTC))  # fmt: skip

        def vm(i: int, state: str, when: _dt.datetime, stopped: _dt.datetime | None = None) -> Record:
            return Record(
                kind="instance", id=f"i-{i:04d}", project="default", name=f"vm{i}", labels={"team": f"t{i % 3}"},
                spec={"uuid": "u", "image_id": "img", "image_name": "deb", "type": "small", "vcpus": 1 + i % 4,
                      "memory_mib": 1024, "disk_gib": 10, "node": f"n{i % 3}"},
                status={"state": state, "launched_at": _text(START),
                        "stopped_at": _text(stopped) if stopped else None},
                created_at=_text(START), updated_at=_text(when),
            )  # fmt: skip

        for i in range(INSTANCES):
            await s.commit(Txn([Create(vm(i, "running", START))]))
        stop = START + _dt.timedelta(hours=2, minutes=30)
        for i in range(0, INSTANCES, 3):
            await s.commit(Txn([Update(vm(i, "stopped", stop, stopped=stop))]))
    finally:
        await s.close()


async def _lead(db: Path) -> None:
    """One metering leader until nothing is left to do; prints a line per committed cycle."""
    from minicloud.billing import metering
    from minicloud.cluster.leader import LeaderLoops
    from minicloud.state import SQLiteStore

    now = START + _dt.timedelta(hours=HOURS, minutes=10)
    s = SQLiteStore(db, retain_changes=100_000)
    await s.open()
    loops = LeaderLoops(lambda: True, clock=lambda: now)
    fold = metering.MeterLoop(s, batch=25, close_delay=300)
    close = metering.CloseLoop(s, batch=10, close_delay=300)
    for loop in (fold, close):
        loop.clock = lambda: _text(now)
    loops.register(fold, close)
    loops._leading = True
    loops.term = 1
    for _ in range(100_000):
        a = await loops.run_cycle(fold, 1)
        b = await loops.run_cycle(close, 1)
        print("cycle", flush=True)
        if a is None and b is None:
            break
    await s.close()
    print("settled", flush=True)


async def _outcome(db: Path) -> tuple[dict[str, int], dict[str, str], bool]:
    from minicloud.billing import ledger
    from minicloud.billing.kinds import USAGE
    from minicloud.state import SQLiteStore, list_all

    s = SQLiteStore(db, retain_changes=100_000)
    await s.open()
    try:
        usage = {r.id: USAGE.load(r).spec.quantity for r in await list_all(s, USAGE.name)}
        charges = {}
        for entry in await ledger.entries(s, "default"):
            c = json.loads(entry.spec.charge)
            assert c["usage_id"] not in charges, f"{c['usage_id']} charged twice"
            charges[c["usage_id"]] = c["amount"]
        ok = (await ledger.verify(s, "default")).ok
    finally:
        await s.close()
    return usage, charges, ok


def _leader(db: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.test_billing", "lead", str(db)], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_sigkilled_metering_leaders_make_exactly_the_records_of_an_uninterrupted_one(tmp_path: Path) -> None:
    seed = tmp_path / "seed.db"
    asyncio.run(_seed(seed))
    reference, killed = tmp_path / "reference.db", tmp_path / "killed.db"
    for copy in (reference, killed):
        shutil.copy(seed, copy)
    done = _leader(reference)
    assert done.wait(300) == 0
    kills = 0
    for after in (3, 7, 2, 11, 5, 4, 9, 6):  # committed cycles a leader reports before it is killed
        proc = _leader(killed)
        assert proc.stdout is not None
        for lines, line in enumerate(proc.stdout, start=1):
            if line.startswith("settled") or lines >= after:
                break
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
    final = _leader(killed)
    assert final.wait(300) == 0
    assert kills >= 4, "the leaders settled before most kills: the test did not interrupt work"
    expected_usage, expected_charges, ok = asyncio.run(_outcome(reference))
    usage, charges, chain_ok = asyncio.run(_outcome(killed))
    assert ok and chain_ok
    assert len(expected_usage) >= INSTANCES * 3 * (HOURS - 2)
    assert usage == expected_usage  # same records, same ids, same quantities: no gap, no duplicate
    assert charges == expected_charges  # every usage record charged once, the same amount


if __name__ == "__main__":
    if sys.argv[1] == "lead":
        asyncio.run(_lead(Path(sys.argv[2])))

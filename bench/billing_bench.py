"""Billing bench: closing a month's invoices, the FOCUS export, a day's cost report, and the metering loop's cost
per hour.

Usage::

    .venv/bin/python bench/billing_bench.py [--resources 10000] [--days 31] [--instances 1000] [--sample N] [--json FILE]
    .venv/bin/python bench/billing_bench.py --quick     # 100 resources over 2 days, 100 instances (~10 s)

Everything runs in this process against a SQLite store in a temporary directory on the real disk (``--dir``).

* **Ledger** (setup): ``--resources`` resources in projects of 100, one hourly vCPU charge each for every hour of
  ``--days`` days of October 2026: the records :func:`minicloud.billing.ledger.append_ops` makes for the close loop's
  charges (:func:`minicloud.billing.ledger.charge_of` of the usage record :func:`minicloud.billing.metering.usage_obj`
  makes; hash chain and head included), **bulk-loaded** before the store opens: the store's migrations, its record
  encoding (:func:`minicloud.state.sqlite.record_params`) and ``executemany`` in one SQLite transaction per project,
  each hour at its own revision, the change log empty; the last project's chain must pass
  :func:`minicloud.billing.ledger.verify`. Timed (entries/s), not part of any figure below; 10,000 resources x 31
  days through ``Store.commit`` took ~100 min.
* **Close a month's invoices**: :func:`minicloud.billing.invoices.close_invoice` for every project (read the chain,
  select, render, store the document); wall time, CPU time, peak Python memory of one project's (tracemalloc;
  projects close one after the other) and the process's peak RSS (``getrusage``). Peer: reading ledger entries and
  summing their amounts (decode + Decimal), the least any invoice must do.
* **FOCUS export**: :func:`minicloud.billing.costs.focus_chunks` (streamed, as the API serves it) of the month;
  rows per second and the peak memory of one project's. Peer: writing rows of the same width with :mod:`csv` alone.
* **Cost report**: :func:`minicloud.billing.costs.cost_report` for the ledger's last day by service (``--since
  DAY``, asked ten minutes after it ended), which reads that day and the month so far (for the forecast) through the
  ledger entries' (project, charge hour) index, against the same report computed from every charge of the ledgers
  (the full scan the report made before that index); the two must give the same rows, totals and forecast.
* **Metering loop**: ``--instances`` running instances; one hour of the ``billing:meter`` and ``billing:close``
  loops (fold their start, close the hour: one usage record and one charge per instance and meter): CPU seconds per
  run, i.e. the metering cost per hour of such a cluster. Peer: committing the same number of records to the store
  in the same transaction sizes.

``--sample N`` runs the peers, the FOCUS export and the full-scan report over the first N projects only (at 10,000
resources they take as long as the close itself); the close and the indexed report always cover every project.

Exit status 1 when a step failed or produced other counts than expected (the bench did not measure what it says).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as _dt
import io
import json
import resource
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minicloud.billing import costs, invoices, ledger, metering  # noqa: E402
from minicloud.billing.kinds import (  # noqa: E402
    CURSOR_ID,
    LEDGER_HEAD,
    METER_CURSOR,
    USAGE,
    LedgerHeadSpec,
    MeterCursorSpec,
    MeterStateSpec,
)
from minicloud.billing.meters import HOUR  # noqa: E402
from minicloud.cluster.leader import LeaderLoops  # noqa: E402
from minicloud.core.context import Context  # noqa: E402
from minicloud.iam.kinds import PROJECT, ProjectSpec, ProjectStatus  # noqa: E402
from minicloud.state import Create, Record, SQLiteStore, Txn, list_all, sqlite  # noqa: E402
from minicloud.state.migrations import migrate  # noqa: E402

PERIOD = "2026-10"
START = int(_dt.datetime(2026, 10, 1, tzinfo=_dt.UTC).timestamp())
PER_PROJECT = 100
STAMP = "2026-11-01T00:10:00.000Z"


def charge(project: str, resource: int, hour: int) -> dict[str, Any]:
    rid = f"i-{resource:06d}"
    state = MeterStateSpec(resource_kind="instance", resource_id=rid, resource_name=f"vm{resource}",
                           attrs={"type": "small", "node": f"n{resource % 8}"})  # fmt: skip
    usage = metering.usage_obj(project, {"team": f"t{resource % 5}"}, state, ("compute.vcpu-hour", hour, 7200), STAMP)
    c = ledger.charge_of(usage, [])
    c.update(price="0.004", price_id="price-bench", currency="EUR", amount="0.0080000000")
    return c


def ledger_records(project: str, first: int, last: int, days: int) -> Iterator[tuple[Record, int]]:
    """The records of one project's ledger as the close loop writes them (one transaction, at its own revision, per
    hour: the hour's charges appended after the head), with the hash chain: ``(record, revision offset)``; the
    head's record last."""
    head = None
    for h in range(days * 24):
        hour = START + h * HOUR
        batch = [charge(project, r, hour) for r in range(first, last)]
        ops = ledger.append_ops(project, head, batch, STAMP)
        for op in ops[:-1]:
            yield op.record, h
        seq = (head.spec.seq if head is not None else 0) + len(batch)
        head = _head(project, seq, ops[-2].record.spec["hash"])
    assert head is not None
    yield LEDGER_HEAD.dump(head), days * 24 - 1


def build_ledger(path: Path, resources: int, days: int) -> tuple[list[str], int]:
    """Bulk-load the bench's ledger into a new state database at ``path`` (before the store opens it): the store's
    own schema (its migrations) and record encoding (:func:`sqlite.record_params`), ``executemany`` in one SQLite
    transaction per project, each hour's entries at their own revision, the change log empty (compacted there, as
    after a replica's reset). The records are those :func:`ledger.append_ops` makes for the close loop's charges."""
    projects = [f"p{i:04d}" for i in range((resources + PER_PROJECT - 1) // PER_PROJECT)]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        migrate(db)
        made = [
            PROJECT.new(project="", name=p, spec=ProjectSpec(), status=ProjectStatus(), stamp=STAMP) for p in projects
        ]
        revision = 1
        entries = 0
        db.execute("BEGIN IMMEDIATE")
        db.executemany(sqlite.INSERT_RECORD, [sqlite.record_params(PROJECT.dump(p), revision) for p in made])
        db.execute("COMMIT")
        for index, project in enumerate(projects):
            first, last = index * PER_PROJECT, min(resources, (index + 1) * PER_PROJECT)
            base = revision + 1
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                sqlite.INSERT_RECORD,
                (sqlite.record_params(r, base + offset) for r, offset in ledger_records(project, first, last, days)),
            )
            revision = base + days * 24 - 1
            entries += (last - first) * days * 24
            db.execute("COMMIT")
        cursor = METER_CURSOR.new(project="", name="meter", id=CURSOR_ID, stamp=STAMP,
                                  spec=MeterCursorSpec(revision=revision + 1, closed_until=START + 40 * 24 * HOUR))  # fmt: skip
        revision += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute(sqlite.INSERT_RECORD, sqlite.record_params(METER_CURSOR.dump(cursor), revision))
        db.execute("UPDATE meta SET value = ? WHERE key IN ('revision', 'compacted')", (revision,))
        db.execute("COMMIT")
    finally:
        db.close()
    return projects, entries


def _head(project: str, seq: int, digest: str) -> Any:
    return LEDGER_HEAD.new(project=project, name="head", id=f"lhd-{project}", spec=LedgerHeadSpec(seq=seq, hash=digest),
                           stamp=STAMP)  # fmt: skip


def measured(fn):  # type: ignore[no-untyped-def]
    """Time ``fn`` (wall, CPU); with ``trace=True`` its peak Python memory instead (tracemalloc slows it down, so a
    traced run's times are not reported)."""

    async def run(*args: Any, trace: bool = False) -> tuple[Any, float, float, int]:
        if trace:
            tracemalloc.start()
        wall, cpu = time.perf_counter(), time.process_time()
        result = await fn(*args)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        peak = 0
        if trace:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return result, wall, cpu, peak

    return run


@measured
async def render_one(store: SQLiteStore, project: str) -> str:
    """One project's invoice rendered as closing renders it (read the chain, select, render), not stored."""
    document, _, _ = await invoices.build(store, project, PERIOD)
    return document


@measured
async def close_all(store: SQLiteStore, projects: list[str]) -> Decimal:
    total = Decimal(0)
    now = _dt.datetime(2026, 11, 2, tzinfo=_dt.UTC)
    for project in projects:
        written = await invoices.close_invoice(Context.system("bench", project=project), store, PERIOD, now)
        total += Decimal(written.body.totals["EUR"])
    return total


@measured
async def read_and_sum(store: SQLiteStore, projects: list[str]) -> Decimal:
    total = Decimal(0)
    for project in projects:
        for entry in await ledger.entries(store, project):
            total += Decimal(json.loads(entry.spec.charge)["amount"])
    return total


@measured
async def focus_all(store: SQLiteStore, projects: list[str]) -> int:
    """The export streamed as the API streams it (:func:`costs.focus_chunks`), chunks counted and dropped."""
    rows = -1
    async for chunk in costs.focus_chunks(store, projects, PERIOD, currency="EUR"):
        rows += chunk.count("\n")
    return rows


def report_day(days: int) -> tuple[str, _dt.datetime]:
    """The cost report measured: the ledger's last day by service, as ``cost report --since DAY --group-by service
    --granularity day`` asks it ten minutes after that day ended (with 31 days: the hour after the month ended, so
    its forecast is of an empty November; with fewer, the forecast reads October so far)."""
    end = _dt.datetime.fromtimestamp(START, _dt.UTC) + _dt.timedelta(days=days)
    return f"{end - _dt.timedelta(days=1):%Y-%m-%d}", end + _dt.timedelta(minutes=10)


@measured
async def report_range(store: SQLiteStore, projects: list[str], days: int) -> Any:
    """:func:`costs.cost_report`: reads the day (and the month so far, for the forecast) through the hour index."""
    since, now = report_day(days)
    return await costs.cost_report(store, projects, since=since, group_by="service", granularity="day", now=now)


@measured
async def report_full_scan(store: SQLiteStore, projects: list[str], days: int) -> Any:
    """The same report as it was computed before the hour index: every charge of the ledgers read, then filtered."""
    since, now = report_day(days)
    now_s = int(now.timestamp())
    start = costs.parse_since(since, now_s)
    charges = await costs.load_charges(store, projects)
    rows, totals, unpriced = costs.report(charges, projects=projects, since=start, until=now_s + HOUR,
                                          group_by="service", granularity="day")  # fmt: skip
    return rows, totals, unpriced, costs.forecast(charges, closed_until=await costs.closed_until(store), now=now_s)


@measured
async def plain_csv(rows: int) -> int:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    row = ["0.0080000000", "p0001", "x" * 20, "EUR", "2026-11-01T00:00:00Z"] * 7 + ["x"] * 3
    for _ in range(rows):
        w.writerow(row)
    return rows


def instance(i: int, state: str, when: str) -> Record:
    return Record(
        kind="instance", id=f"i-{i:06d}", project=f"p{i // PER_PROJECT:04d}", name=f"vm{i}", labels={},
        spec={"type": "small", "vcpus": 2, "memory_mib": 2048, "disk_gib": 10, "node": f"n{i % 8}"},
        status={"state": state, "launched_at": when}, created_at=when, updated_at=when,
    )  # fmt: skip


async def metering_hour(store: SQLiteStore, instances: int) -> dict[str, float]:
    t0 = _dt.datetime(2026, 12, 1, 10, tzinfo=_dt.UTC)
    when = t0.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    ops = [Create(instance(i, "running", when)) for i in range(instances)]
    cpu = time.process_time()
    for start in range(0, len(ops), 500):
        await store.commit(Txn(ops[start : start + 500]))
    write_cpu = time.process_time() - cpu
    now = [t0 + _dt.timedelta(minutes=5)]
    loops = LeaderLoops(lambda: True, clock=lambda: now[0])
    fold = metering.MeterLoop(store, batch=2000, close_delay=300)
    close = metering.CloseLoop(store, batch=500, close_delay=300)
    for loop in (fold, close):
        loop.clock = lambda: now[0].isoformat(timespec="milliseconds").replace("+00:00", "Z")
    loops.register(fold, close)
    loops._leading = True
    loops.term = 1

    async def settle() -> None:
        for _ in range(500):
            a = await loops.run_cycle(fold, 1)
            b = await loops.run_cycle(close, 1)
            if a is None and b is None:
                return
        raise RuntimeError("the billing loops did not settle")

    await settle()  # fold the creates
    before = len(await list_all(store, USAGE.name))
    now[0] = t0 + _dt.timedelta(hours=1, minutes=10)
    cpu = time.process_time()
    await settle()  # one hour closed: usage records and charges for every instance
    hour_cpu = time.process_time() - cpu
    records = len(await list_all(store, USAGE.name)) - before
    return {"hour_cpu_s": hour_cpu, "write_cpu_s": write_cpu, "usage_records": records}


def max_rss_mib() -> float:
    """The process's peak resident set so far (``getrusage``; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(args: argparse.Namespace) -> int:
    failed = False
    figures: dict[str, Any] = {"resources": args.resources, "days": args.days, "instances": args.instances}
    with tempfile.TemporaryDirectory(prefix="billing-bench-", dir=args.dir) as tmp:
        path = Path(tmp) / "state.db"
        t = time.perf_counter()
        projects, entries = await asyncio.to_thread(build_ledger, path, args.resources, args.days)
        build_s = time.perf_counter() - t
        size = await asyncio.to_thread(lambda: sum(p.stat().st_size for p in Path(tmp).glob("state.db*")))
        print(f"ledger: {entries} hourly charges of {args.resources} resources in {len(projects)} projects "
              f"over {args.days} days (setup: bulk load {build_s:.1f} s, {entries / build_s:,.0f} entries/s, "
              f"database {size / 2**20:,.0f} MiB; peak RSS {max_rss_mib():.0f} MiB)")  # fmt: skip
        figures.update(build_s=build_s, db_mib=size / 2**20)
        store = SQLiteStore(path, retain_changes=1_000_000)
        await store.open()
        try:
            check = await ledger.verify(store, projects[-1])  # the loaded chain is one billing verify accepts
            if not check.ok or check.entries != entries - (len(projects) - 1) * PER_PROJECT * args.days * 24:
                print(f"errors:\nthe loaded ledger of {projects[-1]} does not verify: {check}")
                failed = True
            _, _, _, peak = await render_one(store, projects[0], trace=True)  # closing's peak: one project at a time
            total, wall, cpu, _ = await close_all(store, projects)
            close_rss = max_rss_mib()
            sample = projects[: args.sample or len(projects)]
            sampled = entries * len(sample) // len(projects)
            peer, pwall, _pcpu, _ = await read_and_sum(store, sample)
            _, _, _, ppeak = await read_and_sum(store, projects[:1], trace=True)
            expected = Decimal("0.008") * entries
            if total != expected or peer != Decimal("0.008") * sampled:
                print(f"errors:\ninvoices total {total}, ledger sum {peer}, expected {expected}")
                failed = True
            print(f"close {len(projects)} invoices: {wall:.2f} s wall, {cpu:.2f} s CPU, peak {peak / 2**20:.1f} MiB per "
                  f"project ({entries / wall:,.0f} charges/s, {entries / max(cpu, 1e-9):,.0f} per CPU second); "
                  f"process peak RSS {close_rss:.0f} MiB")  # fmt: skip
            print(f"peer read+sum the ledger of {len(sample)} projects: {pwall:.2f} s wall, peak {ppeak / 2**20:.1f} "
                  f"MiB per project; ratio close/read {wall / len(projects) / (pwall / len(sample)):.2f}")  # fmt: skip
            figures.update(close_s=wall, close_cpu_s=cpu, close_peak_mib=peak / 2**20, close_rss_mib=close_rss,
                           read_s=pwall)  # fmt: skip
            rows, fwall, fcpu, _ = await focus_all(store, sample)
            _, _, _, fpeak = await focus_all(store, projects[:1], trace=True)  # it streams one project at a time
            if rows != sampled:
                print(f"errors:\nFOCUS rows {rows}, expected {sampled}")
                failed = True
            _, cwall, _ccpu, _cpeak = await plain_csv(min(rows, 1_000_000))
            csv_rate = min(rows, 1_000_000) / cwall
            print(f"FOCUS export: {rows} rows ({len(sample)} projects) in {fwall:.2f} s ({rows / fwall:,.0f} rows/s; {fcpu:.2f} s CPU: {rows / max(fcpu, 1e-9):,.0f} rows per CPU second), peak "
                  f"{fpeak / 2**20:.1f} MiB per project (streamed); peer csv alone {csv_rate:,.0f} rows/s; "
                  f"ratio {rows / fwall and csv_rate / (rows / fwall):.1f}; process peak RSS {max_rss_mib():.0f} MiB")  # fmt: skip
            figures.update(focus_rows_per_s=rows / fwall, focus_peak_mib=fpeak / 2**20, csv_rows_per_s=csv_rate)
            ranged_all, awall, acpu, _ = await report_range(store, projects, args.days)
            ranged, rwall, rcpu, _ = await report_range(store, sample, args.days)
            full, swall, scpu, _ = await report_full_scan(store, sample, args.days)
            if (ranged.rows, ranged.totals, ranged.unpriced, ranged.forecast) != full:
                print(f"errors:\nthe ranged report differs from the full scan:\n{ranged}\n{full[:2]}")
                failed = True
            day = sum(r.charges for r in ranged_all.rows)
            print(f"cost report, 1 day of {args.days} ({day} charges) by service over {len(projects)} projects: "
                  f"{awall:.2f} s wall ({acpu:.2f} s CPU) through the hour index")  # fmt: skip
            print(f"cost report over {len(sample)} projects: {rwall:.2f} s wall ({rcpu:.2f} s CPU) through the hour "
                  f"index; {swall:.2f} s wall ({scpu:.2f} s CPU) reading the whole ledger; ratio "
                  f"{swall / max(rwall, 1e-9):.1f}")  # fmt: skip
            figures.update(report_all_s=awall, report_s=rwall, report_full_scan_s=swall, report_charges=day)
            m = await metering_hour(store, args.instances)
            if m["usage_records"] != args.instances * 3:  # vCPU, memory, root disk
                print(f"errors:\nusage records {m['usage_records']}, expected {args.instances * 3}")
                failed = True
            print(f"metering one hour of {args.instances} running instances: {m['hour_cpu_s']:.2f} s CPU "
                  f"({m['usage_records']} usage records + charges); peer: writing {args.instances} records "
                  f"{m['write_cpu_s']:.2f} s CPU; ratio {m['hour_cpu_s'] / max(m['write_cpu_s'], 1e-9):.1f}")  # fmt: skip
            figures.update(metering=m)
        finally:
            await store.close()
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(figures, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resources", type=int, default=10_000)
    p.add_argument("--days", type=int, default=31)
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="100 resources over 2 days, 100 instances")
    p.add_argument("--dir", default=None, help="where the temporary store lives (default: the system's)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--sample", type=int, default=0,
                   help="the peers, the FOCUS export and the full-scan report over the first N projects only (0: all)")  # fmt: skip
    a = p.parse_args()
    if a.quick:
        a.resources, a.days, a.instances = 100, 2, 100
    sys.exit(asyncio.run(main(a)))

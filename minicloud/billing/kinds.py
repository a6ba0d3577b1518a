"""Billing's kinds, all internal (no view: never streamed, never served by the generic routes; the billing API
renders them itself). Declarations import msgspec alone.

- ``metercursor`` (one, cluster): the revision of the change log the meter has consumed, the log's clock there,
  and the hour every meter state is closed up to.
- ``meterstate`` (one per billable resource, in its project; named by the resource id): what the resource consumes
  now (rates per meter), since when, the hour its usage is closed up to, and the usage of completed segments in
  hours not closed yet. Removed once the resource is gone and its last hour closed.
- ``usage`` (append-only, per project): one closed hour of one meter of one resource, id derived from the key
  (resource, meter, hour); a correction (late data) is another record keyed by the change that caused it.
- ``price`` (cluster): one version of a meter's price, in force from ``effective`` until the next version.
- ``ledgerentry`` (append-only, per project, named by its zero-padded sequence number) and ``ledgerhead`` (one per
  project): the hash chain of charges.
- ``invoice`` (per project, named by its period ``YYYY-MM``): a closed invoice and its rendered document.
- ``budget`` (per project, named): an amount per month with thresholds; its status is what the budget loop
  measured this month (spend, forecast, thresholds crossed, exhausted).

Growth: meter states are bounded by live resources; budgets by what administrators create; usage records and
ledger entries grow by one per resource, meter and hour and are pruned by :mod:`minicloud.billing.retention`
(``billing.usage_days``, ``billing.ledger_months``); invoices by one per project and month; prices by versions.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud.core.kinds import Kind, declare


class MeterCursorSpec(msgspec.Struct, kw_only=True):
    #: The last change-log revision folded into the meter states.
    revision: int = 0
    #: The log's clock: the latest time stamp seen in a change up to ``revision`` (epoch seconds).
    clock: int = 0
    #: Every meter state is closed up to this hour (epoch seconds; usage before it is in usage records).
    closed_until: int = 0
    #: Wall-clock time (epoch seconds) of the last cycle that had folded every committed change: hours ending
    #: ``billing.close_delay`` before it may close.
    watermark: int = 0
    #: Times the log had been compacted past ``revision`` and the meter resynchronised from the records.
    resyncs: int = 0


METER_CURSOR = declare(
    Kind(name="metercursor", plural="metercursors", prefix="mcur", spec=MeterCursorSpec, scope="cluster")
)
CURSOR_ID = "mcur-meter"


class MeterStateSpec(msgspec.Struct, kw_only=True):
    resource_kind: str
    resource_id: str
    resource_name: str = ""
    #: What a usage record says of the resource besides labels (instance type, pool, node).
    attrs: dict[str, str] = {}
    #: Units per second consumed now, by meter (e.g. ``compute.vcpu-hour``: vCPUs while running).
    rates: dict[str, int] = {}
    #: The current rates apply from here (epoch seconds).
    since: int = 0
    #: Usage before this hour boundary is in usage records (epoch seconds).
    closed_until: int = 0
    #: Usage of completed segments in hours not closed yet: hour (epoch seconds, as text) → meter → quantity.
    pending: dict[str, dict[str, int]] = {}
    #: The resource was deleted; the state goes once its last hour is closed.
    gone: bool = False
    #: The last cumulative value seen of each counter meter (a bucket's requests, bytes sent).
    counters: dict[str, int] = {}


METER_STATE = declare(Kind(name="meterstate", plural="meterstates", prefix="mst", spec=MeterStateSpec))


class UsageSpec(msgspec.Struct, kw_only=True):
    resource_kind: str
    resource_id: str
    resource_name: str = ""
    meter: str
    #: The hour (epoch seconds of its start).
    hour: int
    #: Unit-seconds (vCPU-seconds, MiB-seconds, GiB-seconds, byte-seconds, address-seconds); negative in a
    #: correction that takes usage back.
    quantity: int
    attrs: dict[str, str] = {}
    #: A correction of an hour already closed: the change-log revision whose late transition it folds in.
    correction_of: int = 0


USAGE = declare(Kind(name="usage", plural="usage", prefix="use", spec=UsageSpec))


class PriceSpec(msgspec.Struct, kw_only=True):
    meter: str
    #: Per hour of the meter's unit, a decimal string (never a float).
    amount: str
    currency: str
    #: In force from (epoch seconds, an hour boundary) until the next version's ``effective`` or ``until``.
    effective: int
    until: int | None = None
    description: str = ""


PRICE = declare(Kind(name="price", plural="prices", prefix="price", spec=PriceSpec, scope="cluster"))


class LedgerEntrySpec(msgspec.Struct, kw_only=True):
    seq: int
    #: The previous entry's hash ("" for the first).
    prev: str
    #: The charge, as its canonical JSON text (what the hash covers).
    charge: str
    #: sha256 hex of ``prev`` + ``charge``.
    hash: str


LEDGER_ENTRY = declare(Kind(name="ledgerentry", plural="ledgerentries", prefix="led", spec=LedgerEntrySpec))


class LedgerHeadSpec(msgspec.Struct, kw_only=True):
    seq: int = 0
    hash: str = ""
    #: The checkpoint of a pruned chain: entries up to ``base_seq`` were removed by retention (settled on closed
    #: invoices); the first kept entry links to ``base_hash``, the hash of the last removed one.
    base_seq: int = 0
    base_hash: str = ""


LEDGER_HEAD = declare(Kind(name="ledgerhead", plural="ledgerheads", prefix="lhd", spec=LedgerHeadSpec))


class InvoiceSpec(msgspec.Struct, kw_only=True):
    period: str
    #: The last ledger sequence number it covers, and the previous closed invoice's (period, through) it follows.
    through: int
    previous_period: str = ""
    previous_through: int = 0
    #: The rendered document (canonical JSON) and its sha256.
    document: str
    sha256: str
    closed_at: str = ""


INVOICE = declare(Kind(name="invoice", plural="invoices", prefix="inv", spec=InvoiceSpec))


class BudgetSpec(msgspec.Struct, kw_only=True):
    #: Per calendar month (UTC), a decimal string.
    amount: str
    currency: str
    #: Percentages of ``amount`` that notify, on actual spend (and on the forecast with ``forecast``).
    thresholds: list[int] = msgspec.field(default_factory=lambda: [50, 80, 100])
    forecast: bool = True
    #: The id of an alarm of the project whose webhook actions receive the notifications ("" for none).
    alarm: str = ""
    #: Refuse new billable resources (409) once the month's spend reaches ``amount``.
    enforce: bool = False
    #: Also stop the project's running instances once the month's spend reaches ``amount`` (the operator's choice;
    #: implies ``enforce``). Instances started again that month are stopped again.
    stop_instances: bool = False
    description: str = ""


class BudgetStatus(msgspec.Struct, kw_only=True):
    #: The month the figures are of (``YYYY-MM``; "" before the first cycle).
    period: str = ""
    spent: str = "0"
    forecast: str = "0"
    #: The ledger sequence number read up to.
    through_seq: int = 0
    #: Thresholds crossed this month: ``actual:80``, ``forecast:100``.
    crossed: list[str] = []
    exhausted: bool = False
    #: The notifications of this month: {key, at, spent, forecast, deliveries}.
    notifications: list[dict[str, Any]] = []
    checked_at: str = ""
    #: Instances stopped by ``stop_instances`` (the last few): {instance_id, name, at}.
    stopped: list[dict[str, Any]] = []


BUDGET = declare(Kind(name="budget", plural="budgets", prefix="bud", spec=BudgetSpec, status=BudgetStatus))


class PolicySpec(msgspec.Struct, kw_only=True):
    #: ``auto-stop``: stop running instances of the selector idle for ``idle`` seconds.
    type: str
    #: Label selector: every key=value must match the instance's labels.
    selector: dict[str, str]
    idle: int
    #: Idle means CPU (percent of the instance's vCPUs) stayed under this over the whole window.
    cpu_percent: float = 5.0
    #: An alarm of the project whose webhook actions are told of each stop ("" for none).
    alarm: str = ""
    description: str = ""


class PolicyStatus(msgspec.Struct, kw_only=True):
    #: The latest stops, newest last (at most 100): {instance_id, name, at, max_cpu_percent}.
    actions: list[dict[str, Any]] = []
    checked_at: str = ""
    last_error: str = ""


POLICY = declare(Kind(name="policy", plural="policies", prefix="pol", spec=PolicySpec, status=PolicyStatus))

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

Growth: meter states are bounded by live resources; usage records and ledger entries grow by one per resource, meter
and hour (the record of what was charged: kept, like invoices, until an operator archives them); prices by versions.
"""

from __future__ import annotations

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

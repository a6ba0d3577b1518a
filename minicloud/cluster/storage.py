"""etcd's storage as the cluster sees it: database size against the quota, alarms, and when to defragment.

Pure functions over the figures etcd reports (``maintenance/status``: ``dbSize``, ``dbSizeInUse``; the alarm list),
so ``cluster show`` and the defragmentation duty decide the same way and are unit-tested without an etcd.

Why it matters: etcd refuses every write once its backend database reaches ``--quota-backend-bytes`` (the NOSPACE
alarm) until space is reclaimed *and* the alarm is disarmed. Compaction (``--auto-compaction-*``) frees pages inside
the file; only defragmentation gives them back, one member at a time since a member is blocked while it runs.
"""

from __future__ import annotations

from minicloud.model import EtcdStorage

#: ``cluster show`` warns once a member's database passes this share of the quota.
WARN_AT = 0.8
#: Defragment a member when at least this share of its file is free pages ...
DEFRAG_FREE_SHARE = 0.5
#: ... and they amount to at least this many bytes (defragmenting a small file gains nothing).
DEFRAG_MIN_FREE = 64 << 20


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


def assess(
    member: str, db_size: int, in_use: int, quota: int, alarms: list[str], warn_at: float = WARN_AT
) -> EtcdStorage:
    """One member's storage figures and, when it needs the operator's attention, a warning saying what to do."""
    used = db_size / quota if quota > 0 else 0.0
    warning = None
    if "NOSPACE" in alarms:
        warning = (
            f"etcd on {member} hit its quota ({_mib(quota)}): the cluster refuses writes. Free space (delete what is "
            "no longer needed), let compaction and defragmentation run, or raise cluster.etcd_quota_bytes and "
            "restart the agents; the alarm is disarmed once the database is below the quota"
        )
    elif alarms:
        warning = f"etcd on {member} raised alarm(s) {', '.join(sorted(alarms))}; see its log (etcd.log)"
    elif quota > 0 and used >= warn_at:
        warning = (
            f"etcd on {member} uses {_mib(db_size)} of its {_mib(quota)} quota ({used:.0%}); at 100 % the cluster "
            "refuses writes. Delete what is no longer needed or raise cluster.etcd_quota_bytes"
        )
    return EtcdStorage(
        member=member,
        db_size_bytes=db_size,
        db_in_use_bytes=in_use,
        quota_bytes=quota,
        used_percent=round(used * 100, 1),
        alarms=sorted(alarms),
        warning=warning,
    )


def needs_defrag(db_size: int, in_use: int) -> bool:
    """True when defragmenting would give back enough of the file to be worth blocking the member for it."""
    free = db_size - in_use
    return db_size > 0 and free >= DEFRAG_MIN_FREE and free / db_size >= DEFRAG_FREE_SHARE


def may_disarm(db_size: int, quota: int) -> bool:
    """A NOSPACE alarm may be disarmed once the (defragmented) database is back under the warning level."""
    return quota > 0 and db_size < quota * WARN_AT

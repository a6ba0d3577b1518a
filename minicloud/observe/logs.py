"""One node's logs: which files hold them, how each line's time is read, filters, merging by time, rotation.

Sources (all under the agent's data directory, so a node's logs are where its state is):

============  ===========================================  ============================================================
service       file(s)                                      a line's time
============  ===========================================  ============================================================
``agent``     ``logs/agent.log`` (JSON lines)              its ``time`` field
``etcd``      ``etcd.log`` (zap JSON)                      its ``ts`` field (RFC 3339, or Unix seconds)
``tsdb``      ``metrics/tsdb.log`` (VictoriaMetrics)       the RFC 3339 time that starts the line
``ceph``      ``ceph/log/*.log`` but RGW's                 ``2026-01-02T15:04:05.123456+0000`` that starts the line
``rgw``       ``ceph/log/client.rgw.*.log``                the same
``dnsmasq``   ``vpc/<network>/dnsmasq.log``                ``Jan  2 15:04:05`` (syslog: local time, the year guessed)
``console``   ``instances/<id>/console.log`` (raw bytes)   none in the line: when the agent first saw it (below)
============  ===========================================  ============================================================

A line without a time of its own (a traceback's continuation, a wrapped message) takes the time of the line before it
in the same file; lines at the head of a file before any timed line take the first time that follows (else the
file's modification time). A **console** line has no time at all: every ``logs.rotate_interval`` the agent notes the
console's size and the time in ``console.log.times``; a line's time is that of the first note at or past its end, so
it is when the agent first saw it (within one interval). Lines written since the last note get the file's
modification time (they were written no later than that).

Rotation: a file past ``logs.max_bytes`` is copied to ``FILE.1`` (older copies shift to ``.2`` … up to
``logs.backups``) and truncated in place (*copy-truncate*): every writer here (QEMU's serial file, etcd's and the
TSDB's stderr, Ceph's and dnsmasq's log files) appends with ``O_APPEND``, so it keeps writing at the new end without a
restart or a signal; what a writer adds between the copy and the truncation is lost (a few lines at most). The agent's
own log is rotated by its logging handler instead (rename, nothing lost). Rotated copies older than
``logs.max_age_days`` are removed.

Grep: a POSIX extended regular expression run by ``grep -E`` (GNU grep's DFA matcher: linear in the input, no
backtracking) in a child process with a deadline (``logs.grep_timeout``); back-references (which would make grep
backtrack) are refused, as are patterns longer than :data:`MAX_PATTERN`.
"""

from __future__ import annotations

import collections
import datetime as _dt
import heapq
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minicloud.model.logs import LogLine

SERVICES = ("agent", "etcd", "tsdb", "ceph", "rgw", "dnsmasq", "console", "audit")
#: Services read from files on each node (``audit`` is the cluster's audit log, read from the store).
NODE_SERVICES = SERVICES[:-1]
MAX_PATTERN = 512
#: A longer line is cut here (with " …[cut]") before it is matched or answered.
MAX_LINE = 16384
#: The most bytes read from one file per query (its newest part): rotation keeps files near ``logs.max_bytes``.
MAX_READ = 64 * 1024 * 1024
TIMES_SUFFIX = ".times"


def iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- time of a line ----------------------------------------------------------------------------------------------------
_ISO = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,](\d{1,9}))?\s?(Z|[+-]\d\d:?\d\d)?(?=\s|$|\t)")
_SYSLOG = re.compile(r"^([A-Z][a-z]{2}) {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) ")
_MONTHS = {
    m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)
}


def parse_iso(text: str) -> float | None:
    """Unix seconds of an RFC 3339 / ISO 8601 time at the start of ``text`` (Ceph's ``+0000``, VictoriaMetrics' and
    zap's ``Z``; no zone means UTC), else None."""
    m = _ISO.match(text)
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    try:
        moment = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=_dt.UTC)
    except ValueError:
        return None
    ts = moment.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        ts -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return ts


def parse_syslog(text: str, now: float | None = None) -> float | None:
    """dnsmasq's ``Jan  2 15:04:05 dnsmasq[12]: …`` in local time; the year is this one, or last year's when that
    would put the line more than a day in the future (a December line read in January)."""
    m = _SYSLOG.match(text)
    if m is None or m[1] not in _MONTHS:
        return None
    now = time.time() if now is None else now
    year = time.localtime(now).tm_year
    for y in (year, year - 1):
        try:
            ts = time.mktime((y, _MONTHS[m[1]], int(m[2]), int(m[3]), int(m[4]), int(m[5]), 0, 0, -1))
        except (OverflowError, ValueError):
            return None
        if ts <= now + 86400:
            return ts
    return None


def parse_json_line(text: str, key: str) -> tuple[float | None, str]:
    """``(time, level)`` of a JSON log line: ``key`` as RFC 3339 or Unix seconds."""
    if not text.startswith("{"):
        return None, ""
    try:
        obj = json.loads(text)
    except ValueError:
        return None, ""
    if not isinstance(obj, dict):
        return None, ""
    value = obj.get(key)
    level = obj.get("level")
    level = level if isinstance(level, str) else ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), level
    if isinstance(value, str):
        return parse_iso(value), level
    return None, level


_VM_LEVEL = re.compile(r"^\S+\t(\w+)\t")


def line_time(fmt: str, text: str) -> tuple[float | None, str]:
    """``(time or None, level)`` of one line in format ``fmt``."""
    if fmt == "json":
        return parse_json_line(text, "time")
    if fmt == "zap":
        return parse_json_line(text, "ts")
    if fmt == "vm":
        m = _VM_LEVEL.match(text)
        return parse_iso(text), (m[1] if m else "")
    if fmt == "ceph":
        return parse_iso(text), ""
    if fmt == "syslog":
        return parse_syslog(text), ""
    return None, ""


# -- sources -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    service: str
    #: The current file; rotated copies are ``path.1`` (newest) … ``path.N``.
    path: Path
    fmt: str
    instance: str = ""

    def files(self) -> list[Path]:
        """Rotated copies oldest first, then the current file (those that exist)."""
        rotated = []
        n = 1
        while True:
            p = self.path.with_name(f"{self.path.name}.{n}")
            if not p.exists():
                break
            rotated.append(p)
            n += 1
        return [*reversed(rotated), *([self.path] if self.path.exists() else [])]


def discover(data_path: Path) -> list[Source]:
    """Every log source present on this node now."""
    d = Path(data_path)
    out = [
        Source("agent", d / "logs" / "agent.log", "json"),
        Source("etcd", d / "etcd.log", "zap"),
        Source("tsdb", d / "metrics" / "tsdb.log", "vm"),
    ]
    for p in sorted((d / "ceph" / "log").glob("*.log")):
        out.append(Source("rgw" if p.name.startswith("client.rgw") else "ceph", p, "ceph"))
    for p in sorted((d / "vpc").glob("*/dnsmasq.log")):
        out.append(Source("dnsmasq", p, "syslog"))
    for p in sorted((d / "instances").glob("*/console.log")):
        out.append(Source("console", p, "raw", instance=p.parent.name))
    return [s for s in out if s.files()]


# -- filters -------------------------------------------------------------------------------------------------------------
class PatternError(ValueError):
    """A grep pattern refused (too long, a back-reference, invalid, or too slow): the message says which."""


_BACKREF = re.compile(r"\\[1-9]")
GREP = shutil.which("grep") or "/usr/bin/grep"


def check_pattern(pattern: str) -> None:
    """Raise :class:`PatternError` unless ``pattern`` is an extended regular expression grep accepts and we allow."""
    if not pattern or len(pattern) > MAX_PATTERN:
        raise PatternError(f"grep patterns are 1 to {MAX_PATTERN} characters")
    if "\n" in pattern or "\0" in pattern:
        raise PatternError("grep patterns are one line")
    if _BACKREF.search(pattern.replace("\\\\", "")):
        raise PatternError("back-references (\\1 … \\9) are not allowed: they make matching backtrack")
    r = subprocess.run([GREP, "-E", "-e", pattern], input=b"", capture_output=True, timeout=10, check=False)
    if r.returncode == 2:
        message = r.stderr.decode(errors="replace").strip().removeprefix("grep: ")
        raise PatternError(f"invalid pattern: {message or 'grep refused it'}")


def grep(pattern: str, texts: list[str], timeout: float) -> list[bool]:
    """Which of ``texts`` (one line each) match ``pattern``; :class:`PatternError` when grep takes over ``timeout``."""
    if not texts:
        return []
    data = "\n".join(texts).encode(errors="replace") + b"\n"
    try:
        r = subprocess.run(
            [GREP, "-E", "-n", "-a", "-e", pattern],
            input=data,
            capture_output=True,
            timeout=timeout,
            check=False,
            env={"LC_ALL": "C.UTF-8", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    except subprocess.TimeoutExpired:
        raise PatternError(f"the pattern took more than {timeout:g} s; make it simpler or narrow --since") from None
    if r.returncode == 2:
        raise PatternError(f"invalid pattern: {r.stderr.decode(errors='replace').strip().removeprefix('grep: ')}")
    hits = [False] * len(texts)
    for row in r.stdout.split(b"\n"):
        number, sep, _ = row.partition(b":")
        if sep and number.isdigit() and 0 < int(number) <= len(texts):
            hits[int(number) - 1] = True
    return hits


@dataclass
class Filter:
    """What a query keeps: ``since``/``until`` as Unix seconds; ``services`` (None: all); ``instances`` (None: any;
    a set: only the consoles of these instances, nothing else); ``pattern`` (checked with :func:`check_pattern`)."""

    since: float | None = None
    until: float | None = None
    services: set[str] | None = None
    instances: set[str] | None = None
    pattern: str | None = None
    grep_timeout: float = 5.0

    def wants(self, source: Source) -> bool:
        if self.instances is not None and (source.service != "console" or source.instance not in self.instances):
            return False
        return self.services is None or source.service in self.services

    def keeps_time(self, ts: float) -> bool:
        return (self.since is None or ts >= self.since) and (self.until is None or ts <= self.until)


# -- reading --------------------------------------------------------------------------------------------------------------
def _cut(text: str) -> str:
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + " …[cut]"


def _read_tail(path: Path, start: int = 0) -> tuple[bytes, int]:
    """The file's bytes from ``start`` (at most :data:`MAX_READ`, the newest) and the offset they start at."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            begin = max(start, size - MAX_READ)
            f.seek(begin)
            return f.read(size - begin), begin
    except FileNotFoundError:
        return b"", start


def read_times(path: Path) -> list[tuple[int, float]]:
    """A console's size notes ``[(offset, unix time)]`` in ascending order."""
    out: list[tuple[int, float]] = []
    try:
        text = path.with_name(path.name + TIMES_SUFFIX).read_text()
    except FileNotFoundError:
        return out
    for row in text.splitlines():
        a, _, b = row.partition(" ")
        try:
            out.append((int(a), float(b)))
        except ValueError:
            continue
    return out


def note_console(path: Path, now: float | None = None) -> bool:
    """Note a console's size and the time now, when it grew since the last note. True when noted."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    notes = read_times(path)
    if notes and notes[-1][0] >= size:
        return False
    with path.with_name(path.name + TIMES_SUFFIX).open("a") as f:
        f.write(f"{size} {time.time() if now is None else now:.6f}\n")
    return True


def parse_file(source: Source, path: Path, node: str, data_path: Path, start: int = 0) -> Iterator[LogLine]:
    """The complete lines of one file (from ``start``) with their times (see the module's docstring)."""
    data, offset = _read_tail(path, start)
    if not data:
        return
    end_complete = data.rfind(b"\n") + 1
    if path == source.path:
        data = data[:end_complete]  # the current file: a partial last line is read once it ends
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        mtime = time.time()
    try:
        rel = str(path.relative_to(data_path))
    except ValueError:
        rel = str(path)
    notes = read_times(path) if source.fmt == "raw" else []

    def line(ts: float, text: str, level: str) -> LogLine:
        return LogLine(
            time=iso(ts), ts=ts, node=node, service=source.service, line=text, source=rel, instance=source.instance,
            level=level,
        )  # fmt: skip

    note_i = 0
    pending: list[tuple[str, str]] = []
    last: float | None = None
    pos = offset
    for raw in data.split(b"\n"):
        if pos >= offset + len(data):
            break
        pos += len(raw) + 1
        text = _cut(raw.decode(errors="replace").rstrip("\r"))
        if not text.strip():
            continue  # blank lines carry nothing to search or read
        if source.fmt == "raw":
            while note_i < len(notes) and notes[note_i][0] < pos:
                note_i += 1
            ts = notes[note_i][1] if note_i < len(notes) else mtime
            level = ""
        else:
            parsed, level = line_time(source.fmt, text)
            if parsed is None:
                if last is None:
                    pending.append((text, level))
                    continue
                ts = last
            else:
                ts = parsed
        for p_text, p_level in pending:
            yield line(ts, p_text, p_level)
        pending.clear()
        last = ts
        yield line(ts, text, level)
    for p_text, p_level in pending:
        yield line(mtime, p_text, p_level)


def _apply(flt: Filter, lines: Iterable[LogLine]) -> list[LogLine]:
    kept = [ln for ln in lines if flt.keeps_time(ln.ts)]
    if flt.pattern:
        hits = grep(flt.pattern, [ln.line for ln in kept], flt.grep_timeout)
        kept = [ln for ln, hit in zip(kept, hits, strict=True) if hit]
    return kept


def read_node(data_path: Path, node: str, flt: Filter, limit: int) -> list[LogLine]:
    """This node's lines that ``flt`` keeps, in time order, the newest ``limit`` (blocking: run it in a thread)."""
    lines: list[LogLine] = []
    for source in discover(data_path):
        if not flt.wants(source):
            continue
        for path in source.files():
            if flt.since is not None and path != source.path:
                try:
                    if path.stat().st_mtime < flt.since:
                        continue  # a rotated copy written before `since` holds nothing newer
                except FileNotFoundError:
                    continue
            lines += parse_file(source, path, node, data_path)
    kept = _apply(flt, lines)
    kept.sort(key=sort_key)
    return kept[-limit:] if limit else kept


def sort_key(line: LogLine) -> tuple[float, str, str, str]:
    return (line.ts, line.node, line.service, line.source)


def merge(per_node: Iterable[list[LogLine]], limit: int) -> list[LogLine]:
    """Lines of several nodes (each in time order) merged by time (a heap merge), the newest ``limit``."""
    out: collections.deque[LogLine] = collections.deque(maxlen=limit or None)
    out.extend(heapq.merge(*per_node, key=sort_key))
    return list(out)


#: How many times this process rotated each file (a follower that sees a new count reads the rest of ``.1``).
_GENERATIONS: dict[Path, int] = {}


def generation(path: Path) -> tuple[int, int]:
    """``(rotations by this process, inode)`` of a file: either changes when it was rotated (copy-truncate here, or
    renamed by the agent's log handler)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        inode = 0
    return _GENERATIONS.get(path, 0), inode


@dataclass
class Follower:
    """Lines appended to this node's sources since it started (new files are read from their start). ``poll()``
    returns what appeared since the last call; after a rotation the rest of the copy (``.1``) is read, then the
    file from its start."""

    data_path: Path
    node: str
    flt: Filter
    offsets: dict[Path, tuple[int, tuple[int, int]]] = field(default_factory=dict)
    sources: Callable[[Path], list[Source]] = discover

    def __post_init__(self) -> None:
        for source in self.sources(self.data_path):
            if self.flt.wants(source):
                self.offsets[source.path] = (_size(source.path), generation(source.path))

    def _read(self, source: Source, path: Path, start: int) -> tuple[list[LogLine], int]:
        got = list(parse_file(source, path, self.node, self.data_path, start))
        data, begin = _read_tail(path, start)
        consumed = begin + data.rfind(b"\n") + 1 if data else start
        return got, consumed

    def poll(self) -> list[LogLine]:
        out: list[LogLine] = []
        for source in self.sources(self.data_path):
            if not self.flt.wants(source):
                continue
            gen = generation(source.path)
            start, seen = self.offsets.get(source.path, (0, gen))
            if gen != seen:  # rotated since the last poll: the rest of the copy, then the new file from its start
                copy = source.path.with_name(source.path.name + ".1")
                if start and copy.exists():
                    got, _ = self._read(source, copy, start)
                    out += got
                start = 0
            size = _size(source.path)
            if size < start:
                start = 0  # shrank without our rotation: read it again from its start
            if size == start:
                self.offsets[source.path] = (size, gen)
                continue
            got, consumed = self._read(source, source.path, start)
            self.offsets[source.path] = (consumed, gen)
            out += got
        kept = _apply(Filter(pattern=self.flt.pattern, grep_timeout=self.flt.grep_timeout), out)
        kept.sort(key=sort_key)
        return kept


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# -- retention -------------------------------------------------------------------------------------------------------------
def rotate(path: Path, max_bytes: int, backups: int) -> bool:
    """Copy-truncate ``path`` when it is past ``max_bytes``: ``.N-1`` → ``.N`` …, ``path`` → ``.1``, then ``path``
    emptied in place (its writers append, so they go on at its new end). A console's ``.times`` notes follow
    their file. True when rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    times = path.with_name(path.name + TIMES_SUFFIX)
    for n in range(backups, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if n == backups:
            older.unlink(missing_ok=True)
            older.with_name(older.name + TIMES_SUFFIX).unlink(missing_ok=True)
            continue
        newer = path.with_name(f"{path.name}.{n + 1}")
        if older.exists():
            os.replace(older, newer)
        older_times = older.with_name(older.name + TIMES_SUFFIX)
        if older_times.exists():
            os.replace(older_times, newer.with_name(newer.name + TIMES_SUFFIX))
    first = path.with_name(f"{path.name}.1")
    shutil.copy2(path, first)
    if times.exists():
        shutil.copy2(times, first.with_name(first.name + TIMES_SUFFIX))
    os.truncate(path, 0)
    if times.exists():
        os.truncate(times, 0)
    _GENERATIONS[path] = _GENERATIONS.get(path, 0) + 1
    return True


def prune(source: Source, max_age: float, now: float | None = None) -> list[Path]:
    """Remove rotated copies of ``source`` older than ``max_age`` seconds; the ones removed."""
    now = time.time() if now is None else now
    removed = []
    for path in source.files():
        if path == source.path:
            continue
        try:
            if now - path.stat().st_mtime > max_age:
                path.unlink()
                path.with_name(path.name + TIMES_SUFFIX).unlink(missing_ok=True)
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def retention_pass(data_path: Path, *, max_bytes: int, backups: int, max_age: float) -> int:
    """One pass over this node's sources: consoles noted, files past the size rotated (not the agent's own log,
    which its handler rotates), old copies removed. Returns how many files were rotated."""
    rotated = 0
    for source in discover(data_path):
        if source.fmt == "raw":
            note_console(source.path)
        if source.service != "agent" and rotate(source.path, max_bytes, backups):
            rotated += 1
            if source.fmt == "raw":
                note_console(source.path)
        prune(source, max_age)
    return rotated

"""Rate limits: token buckets per principal, a bucket of failed authentications per source address (checked with
:meth:`RateLimiter.wait` *before* authenticating, charged with :meth:`RateLimiter.take` when it fails), and a login
throttle per (user, source address).

All are node-local, in-memory and synchronous: O(1) per call, no background task, memory bounded by ``max_keys``
(the least recently used key is dropped first). Time comes from :func:`time.monotonic` unless the caller passes
``now`` (tests do), so wall-clock jumps neither lock anyone out nor lift a limit. In a cluster each node limits what it
serves; a client spreading requests over N nodes gets up to N times the rate, which is acceptable for abuse control
(these limits protect the node, they are not quotas).

Retry times are whole seconds rounded up (at least 1 when refused), ready for a ``Retry-After`` header: a client that
waits that long finds the request allowed, unless it spent the tokens again meanwhile. :func:`too_many_requests`
builds the 429 error with that header.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from typing import TypeVar

from minicloud.errors import TooManyRequests

_K = TypeVar("_K")

_EPSILON = 1e-9  # so 2.0000000001 s of float error still rounds to 2, not 3


def _retry_seconds(wait: float) -> float:
    return float(max(1, math.ceil(wait - _EPSILON)))


def too_many_requests(retry_after: float, detail: str | None = None) -> TooManyRequests:
    """The 429 error for a refusal, with ``Retry-After`` set to ``retry_after`` whole seconds."""
    seconds = max(1, math.ceil(retry_after))
    return TooManyRequests(
        detail or f"Too many requests; retry in {seconds} s.",
        headers={"Retry-After": str(seconds)},
        retry_after=seconds,
    )


class TokenBucket:
    """``burst`` tokens, refilled continuously at ``rate`` per second; a request spends ``cost`` tokens.

    Starts full. A refused request spends nothing."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError("rate must be a positive number of tokens per second")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:  # a clock that goes backwards (an injected one) refills nothing
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now

    def take(self, now: float | None = None, cost: float = 1.0) -> tuple[bool, float]:
        """(True, 0.0) and spend ``cost`` tokens if there are enough, else (False, seconds until there will be,
        rounded up to whole seconds and at least 1). ValueError if ``cost`` is not in (0, burst]: such a request
        could never pass."""
        if not 0 < cost <= self.burst:
            raise ValueError("cost must be positive and at most the burst")
        self._refill(time.monotonic() if now is None else now)
        if self.tokens >= cost - _EPSILON:
            self.tokens = max(0.0, self.tokens - cost)
            return True, 0.0
        return False, _retry_seconds((cost - self.tokens) / self.rate)

    def wait(self, now: float | None = None, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens will be there (whole seconds rounded up), 0.0 if they are now; spends
        nothing."""
        self._refill(time.monotonic() if now is None else now)
        if self.tokens >= cost - _EPSILON:
            return 0.0
        return _retry_seconds((cost - self.tokens) / self.rate)


class RateLimiter:
    """One :class:`TokenBucket` per key (a principal id, say), created full on first use.

    At most ``max_keys`` buckets are kept; beyond that the least recently used is dropped. A dropped key starts
    full again, which is exact when it was idle for ``burst / rate`` seconds or more and otherwise errs on the side of
    allowing; with the default bound that only happens under a flood of distinct keys."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        TokenBucket(rate, burst, 0.0)  # validate once, with the bucket's own messages
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float | None = None, cost: float = 1.0) -> tuple[bool, float]:
        """Spend ``cost`` from ``key``'s bucket: (allowed, retry_after seconds), as :meth:`TokenBucket.take`."""
        t = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, t)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(t, cost)

    def wait(self, key: str, now: float | None = None, cost: float = 1.0) -> float:
        """Seconds until ``key`` may spend ``cost`` (0.0 if it may now, or has no bucket yet); spends nothing and
        creates no bucket. With :meth:`take` on failure only, this limits *failures*: check before the work, charge
        when it fails (concurrent checks may each pass, so the overshoot is at most the requests in flight)."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.wait(time.monotonic() if now is None else now, cost)


class LoginThrottle:
    """Limits password guessing: at most ``max_failures`` failed logins per (user, source address) in any
    ``window`` seconds (default 5 per 15 minutes), and ``max_user_failures`` per user from all sources together
    (default 100, NIST SP 800-63B §5.2.2's bound; it stops one account being guessed from many addresses, and is high
    enough that an attacker cannot casually lock a user out everywhere).

    Race-free with concurrent logins: :meth:`attempt` counts the attempt as a failure *before* the password is
    checked, and :meth:`succeeded` clears the counts for that user and source. So a login is::

        allowed, retry_after = throttle.attempt(user, source)
        if not allowed: raise too_many_requests(retry_after, ...)
        if verify_password(...): throttle.succeeded(user, source)

    Refused attempts are not counted, so waiting ``retry_after`` always helps. Pass the user name as the login
    request gave it, normalised the way user names are matched, whether or not such a user exists (so the throttle
    does not reveal which users exist). Memory: at most ``max_keys`` (user, source) entries and ``max_keys`` users,
    each at most ``max_failures`` / ``max_user_failures`` timestamps; least recently used dropped first."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 900.0,
        max_user_failures: int = 100,
        max_keys: int = 100_000,
    ) -> None:
        if max_failures < 1 or max_user_failures < 1 or max_keys < 1 or not window > 0:
            raise ValueError("limits and window must be positive")
        self.max_failures = max_failures
        self.window = float(window)
        self.max_user_failures = max_user_failures
        self.max_keys = max_keys
        self._by_source: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._by_user: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many (user, source) pairs are tracked."""
        return len(self._by_source)

    def _wait(self, failures: deque[float] | None, limit: int, now: float) -> float:
        """Seconds until ``failures`` holds fewer than ``limit`` timestamps inside the window (0 if it already does)."""
        if failures is None:
            return 0.0
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < limit:
            return 0.0
        return failures[-limit] + self.window - now

    @staticmethod
    def _record(table: OrderedDict[_K, deque[float]], key: _K, limit: int, max_keys: int, now: float) -> None:
        failures = table.get(key)
        if failures is None:
            while len(table) >= max_keys:
                table.popitem(last=False)
            failures = table[key] = deque(maxlen=limit)
        else:
            table.move_to_end(key)
        failures.append(now)

    def attempt(self, user: str, source: str, now: float | None = None) -> tuple[bool, float]:
        """(True, 0.0) and count a provisional failure if a login may be tried now; else (False, whole seconds to
        wait, at least 1) and count nothing."""
        t = time.monotonic() if now is None else now
        wait = max(
            self._wait(self._by_source.get((user, source)), self.max_failures, t),
            self._wait(self._by_user.get(user), self.max_user_failures, t),
        )
        if wait > 0:
            return False, _retry_seconds(wait)
        self._record(self._by_source, (user, source), self.max_failures, self.max_keys, t)
        self._record(self._by_user, user, self.max_user_failures, self.max_keys, t)
        return True, 0.0

    def succeeded(self, user: str, source: str) -> None:
        """The password was right: forget the failures of ``user`` from ``source`` and the user's overall count."""
        self._by_source.pop((user, source), None)
        self._by_user.pop(user, None)

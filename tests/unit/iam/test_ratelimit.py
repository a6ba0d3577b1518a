"""Token buckets, the per-key limiter and the login throttle, all driven by an injected clock."""

from __future__ import annotations

import time

import pytest

from minicloud.errors import TooManyRequests
from minicloud.iam.ratelimit import LoginThrottle, RateLimiter, TokenBucket, too_many_requests


def test_bucket_allows_a_burst_then_refuses():
    bucket = TokenBucket(rate=1.0, burst=5, now=0.0)
    assert [bucket.take(0.0)[0] for _ in range(5)] == [True] * 5
    assert bucket.take(0.0) == (False, 1.0)


def test_bucket_refills_at_the_rate_and_never_beyond_the_burst():
    bucket = TokenBucket(rate=2.0, burst=4, now=0.0)
    for _ in range(4):
        bucket.take(0.0)
    assert bucket.take(0.0)[0] is False
    assert bucket.take(0.5) == (True, 0.0)  # 0.5 s at 2/s = one token
    assert bucket.take(0.5)[0] is False
    # a long idle period refills to the burst, no more
    assert [bucket.take(1000.0)[0] for _ in range(5)] == [True, True, True, True, False]


def test_refused_requests_spend_nothing():
    bucket = TokenBucket(rate=1.0, burst=1, now=0.0)
    bucket.take(0.0)
    for t in (0.1, 0.2, 0.5, 0.9):
        assert bucket.take(t)[0] is False
    assert bucket.take(1.0) == (True, 0.0)


@pytest.mark.parametrize(
    ("rate", "elapsed", "cost", "expected"),
    [
        (1.0, 0.0, 1.0, 1.0),  # exactly one second away
        (1.0, 0.25, 1.0, 1.0),  # 0.75 s rounds up to 1
        (0.1, 0.0, 1.0, 10.0),  # slow refill
        (0.1, 2.5, 1.0, 8.0),  # 7.5 s rounds up to 8
        (10.0, 0.0, 1.0, 1.0),  # 0.1 s still says 1: Retry-After is whole seconds
        (1.0, 0.0, 3.0, 3.0),  # a costlier request waits longer
        (3.0, 0.0, 2.0, 1.0),  # 0.666 s
        (0.3, 0.0, 0.6, 2.0),  # 0.6 / 0.3 = 2 despite float error
    ],
)
def test_retry_after_is_whole_seconds_rounded_up(rate, elapsed, cost, expected):
    bucket = TokenBucket(rate=rate, burst=3, now=0.0)
    assert bucket.take(0.0, cost=3.0) == (True, 0.0)  # exactly empty
    allowed, retry_after = bucket.take(elapsed, cost=cost)
    assert (allowed, retry_after) == (False, expected)


def test_waiting_retry_after_is_enough():
    bucket = TokenBucket(rate=0.3, burst=2, now=0.0)
    now = 0.0
    for _ in range(50):
        allowed, retry_after = bucket.take(now)
        if not allowed:
            assert retry_after >= 1
            now += retry_after
            assert bucket.take(now)[0] is True
        now += 0.37


def test_bucket_and_limiter_refuse_nonsense_configuration():
    for rate, burst in ((0, 5), (-1, 5), (float("inf"), 5), (1, 0)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)
        with pytest.raises(ValueError):
            RateLimiter(rate, burst)
    with pytest.raises(ValueError):
        RateLimiter(1, 1, max_keys=0)
    with pytest.raises(ValueError):
        TokenBucket(1, 2).take(cost=3)  # could never pass


def test_clock_going_backwards_grants_nothing():
    bucket = TokenBucket(rate=1.0, burst=1, now=100.0)
    bucket.take(100.0)
    assert bucket.take(50.0)[0] is False
    assert bucket.take(101.0)[0] is True


def test_limiter_keys_are_independent():
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.take("alice", 0.0)[0] and limiter.take("alice", 0.0)[0]
    assert limiter.take("alice", 0.0) == (False, 1.0)
    assert limiter.take("bob", 0.0) == (True, 0.0)
    assert limiter.take("alice", 1.0) == (True, 0.0)


def test_limiter_memory_is_bounded_by_evicting_the_least_recently_used():
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.take(key, 0.0)
    limiter.take("a", 0.0)  # "a" used again: "b" is now least recent
    limiter.take("d", 0.0)
    assert len(limiter) == 3
    assert limiter.take("a", 0.0)[0] is False  # still tracked, still empty
    assert limiter.take("b", 0.0)[0] is True  # evicted, so it starts full
    for i in range(10_000):
        limiter.take(f"k{i}", 0.0)
    assert len(limiter) == 3


def test_limiter_uses_the_monotonic_clock_by_default():
    limiter = RateLimiter(rate=1000.0, burst=1)
    assert limiter.take("k")[0] is True
    time.sleep(0.01)
    assert limiter.take("k")[0] is True


def test_limiter_calls_are_cheap():
    limiter = RateLimiter(rate=1.0, burst=10, max_keys=1000)
    start = time.perf_counter()
    for i in range(50_000):
        limiter.take(f"key-{i % 5000}", i * 0.001)
    assert time.perf_counter() - start < 2.0


def test_too_many_requests_carries_retry_after():
    err = too_many_requests(2.3, "Slow down.")
    assert isinstance(err, TooManyRequests) and err.status == 429
    assert err.headers == {"Retry-After": "3"} and err.detail == "Slow down."
    assert too_many_requests(0.0).headers == {"Retry-After": "1"}
    assert "retry in 5 s" in too_many_requests(5.0).detail


def test_login_lockout_after_five_failures_in_fifteen_minutes():
    throttle = LoginThrottle()
    for i in range(5):
        assert throttle.attempt("alice", "10.0.0.1", now=i * 10.0) == (True, 0.0)
    allowed, retry_after = throttle.attempt("alice", "10.0.0.1", now=60.0)
    assert not allowed and retry_after == 900.0 - 60.0  # until the first failure leaves the window
    assert throttle.attempt("alice", "10.0.0.1", now=899.0)[0] is False
    assert throttle.attempt("alice", "10.0.0.1", now=900.0) == (True, 0.0)
    # that attempt failed too: locked again until the second-oldest failure expires
    assert throttle.attempt("alice", "10.0.0.1", now=900.5) == (False, 10.0)


def test_login_refusals_are_not_counted():
    throttle = LoginThrottle(max_failures=2, window=100.0)
    throttle.attempt("u", "ip", now=0.0)
    throttle.attempt("u", "ip", now=0.0)
    for t in range(1, 100):
        assert throttle.attempt("u", "ip", now=float(t))[0] is False
    assert throttle.attempt("u", "ip", now=100.0)[0] is True


def test_login_success_resets_the_count():
    throttle = LoginThrottle()
    for _ in range(4):
        throttle.attempt("alice", "10.0.0.1", now=0.0)
    assert throttle.attempt("alice", "10.0.0.1", now=1.0)[0] is True  # fifth try: right password
    throttle.succeeded("alice", "10.0.0.1")
    for _ in range(5):
        assert throttle.attempt("alice", "10.0.0.1", now=2.0)[0] is True
    assert throttle.attempt("alice", "10.0.0.1", now=2.0)[0] is False


def test_login_throttle_is_per_user_and_source():
    throttle = LoginThrottle()
    for _ in range(5):
        throttle.attempt("alice", "10.0.0.1", now=0.0)
    assert throttle.attempt("alice", "10.0.0.1", now=0.0)[0] is False
    assert throttle.attempt("alice", "10.0.0.2", now=0.0)[0] is True  # the real Alice elsewhere
    assert throttle.attempt("bob", "10.0.0.1", now=0.0)[0] is True


def test_login_throttle_caps_one_user_across_many_sources():
    throttle = LoginThrottle(max_failures=5, window=900.0, max_user_failures=20)
    for i in range(20):
        assert throttle.attempt("alice", f"10.0.0.{i}", now=0.0)[0] is True
    allowed, retry_after = throttle.attempt("alice", "10.9.9.9", now=30.0)
    assert not allowed and retry_after == 870.0
    assert throttle.attempt("bob", "10.9.9.9", now=30.0)[0] is True
    throttle.succeeded("alice", "10.9.9.9")
    assert throttle.attempt("alice", "10.9.9.9", now=31.0)[0] is True


def test_login_throttle_memory_is_bounded():
    throttle = LoginThrottle(max_failures=1, max_keys=100)
    throttle.attempt("user0", "ip0", now=0.0)
    assert throttle.attempt("user0", "ip0", now=0.0)[0] is False
    for i in range(1, 5000):
        throttle.attempt(f"user{i}", f"ip{i}", now=0.0)
    assert len(throttle) == 100
    assert throttle.attempt("user0", "ip0", now=0.0)[0] is True  # evicted: the bound wins over remembering it


def test_login_throttle_refuses_nonsense_configuration():
    with pytest.raises(ValueError):
        LoginThrottle(max_failures=0)
    with pytest.raises(ValueError):
        LoginThrottle(window=0)


def test_wait_peeks_without_spending_or_creating_a_bucket():
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.wait("src", now=0.0) == 0.0 and len(limiter) == 0  # no bucket made by a peek
    limiter.take("src", now=0.0)
    assert limiter.wait("src", now=0.0) == 0.0  # one token left
    limiter.take("src", now=0.0)
    assert limiter.wait("src", now=0.0) == 1.0
    assert limiter.wait("src", now=0.0) == 1.0  # peeking spent nothing
    assert limiter.wait("src", now=1.0) == 0.0

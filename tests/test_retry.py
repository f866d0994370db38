"""
Tests for L{hammal.upstream.retry}: full-jitter backoff, ``Retry-After``
parsing and the clock-driven L{sleep}.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Callable, Iterator

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.upstream import retry
from hammal.upstream.retry import RetryPolicy, parse_retry_after, sleep


def constant(value: float) -> Callable[[], float]:
    """A C{random} that always returns C{value}."""
    return lambda: value


def sequence(values: list[float]) -> Callable[[], float]:
    """A C{random} that returns C{values} in turn."""
    iterator: Iterator[float] = iter(values)
    return lambda: next(iterator)


def attempts(policy: RetryPolicy, retry_after: float | None = None) -> list[float]:
    """The delays of every retry C{policy} allows, the way a client loops."""
    delays: list[float] = []
    retry = 0
    while True:
        delay = policy.delay(retry, retry_after)
        if delay is None:
            return delays
        delays.append(delay)
        retry += 1
        if retry > 1000:
            raise AssertionError("the policy never stops retrying")


class BackoffTests(SynchronousTestCase):
    """L{RetryPolicy.backoff} is uniform in ``[0, min(cap, base * 2**n)]``."""

    def test_upper_bound(self) -> None:
        """With C{random} at its maximum, the delay is the bound exactly."""
        policy = RetryPolicy(base=0.5, cap=20.0, random=constant(1.0))
        self.assertEqual(
            [policy.backoff(n) for n in range(8)], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
        )

    def test_lower_bound(self) -> None:
        policy = RetryPolicy(random=constant(0.0))
        self.assertEqual([policy.backoff(n) for n in range(6)], [0.0] * 6)

    def test_jitter_scales_bound(self) -> None:
        policy = RetryPolicy(base=1.0, cap=100.0, random=sequence([0.25, 0.5, 0.75]))
        self.assertEqual([policy.backoff(n) for n in (0, 1, 2)], [0.25, 1.0, 3.0])

    def test_bounded_by_cap_and_exponent(self) -> None:
        """For many random draws every delay lies within its bound."""
        draws = [i / 97 for i in range(98)]
        for base, cap in ((0.5, 20.0), (0.1, 1.0), (2.0, 3.0)):
            policy = RetryPolicy(base=base, cap=cap, random=sequence(draws * 12))
            for n in range(12):
                for _ in draws:
                    delay = policy.backoff(n)
                    self.assertGreaterEqual(delay, 0.0)
                    self.assertLessEqual(delay, min(cap, base * 2**n))

    def test_zero_base(self) -> None:
        policy = RetryPolicy(base=0.0, random=constant(1.0))
        self.assertEqual(policy.backoff(5), 0.0)

    def test_high_retry_numbers_stay_capped(self) -> None:
        """A long retry budget (C{--retries} has no maximum) keeps the cap."""
        policy = RetryPolicy(retries=5000, base=0.5, cap=20.0, random=constant(1.0))
        self.assertEqual(policy.backoff(1100), 20.0)
        self.assertEqual(policy.delay(1100, None), 20.0)

    def test_default_random(self) -> None:
        """The default C{random} is real randomness within the bound."""
        policy = RetryPolicy()
        for n in range(10):
            self.assertTrue(0.0 <= policy.backoff(n) <= min(policy.cap, policy.base * 2**n))


class DelayTests(SynchronousTestCase):
    """L{RetryPolicy.delay} decides whether and when to retry."""

    def test_exactly_retries(self) -> None:
        """The number of retries is exactly C{retries}."""
        for retries in (0, 1, 3, 7):
            policy = RetryPolicy(retries=retries, random=constant(1.0))
            self.assertEqual(len(attempts(policy)), retries)

    def test_delays_follow_backoff(self) -> None:
        policy = RetryPolicy(retries=4, base=1.0, cap=5.0, random=constant(1.0))
        self.assertEqual(attempts(policy), [1.0, 2.0, 4.0, 5.0])

    def test_no_retry_beyond_budget(self) -> None:
        policy = RetryPolicy(retries=2)
        self.assertIsNone(policy.delay(2, None))
        self.assertIsNone(policy.delay(3, 1.0))

    def test_retry_after_honoured(self) -> None:
        """C{Retry-After} is a minimum: the longer of it and the backoff."""
        policy = RetryPolicy(base=0.5, cap=20.0, max_retry_after=10.0, random=constant(1.0))
        self.assertEqual(policy.delay(0, 7.0), 7.0)
        self.assertEqual(policy.delay(0, 0.0), 0.5)
        self.assertEqual(policy.delay(2, 1.0), 2.0)

    def test_retry_after_at_limit(self) -> None:
        policy = RetryPolicy(max_retry_after=10.0, random=constant(0.0))
        self.assertEqual(policy.delay(0, 10.0), 10.0)

    def test_retry_after_too_long(self) -> None:
        """A C{Retry-After} over C{max_retry_after} stops retrying at once."""
        policy = RetryPolicy(retries=5, max_retry_after=10.0, random=constant(0.0))
        self.assertIsNone(policy.delay(0, 10.5))
        self.assertEqual(attempts(policy, retry_after=60.0), [])
        self.assertEqual(attempts(policy, retry_after=float("inf")), [])

    def test_retry_after_keeps_budget(self) -> None:
        policy = RetryPolicy(retries=3, random=constant(0.0))
        self.assertEqual(attempts(policy, retry_after=2.0), [2.0, 2.0, 2.0])

    def test_random_not_in_equality(self) -> None:
        self.assertEqual(RetryPolicy(random=constant(0.1)), RetryPolicy(random=constant(0.9)))


class ParseRetryAfterTests(SynchronousTestCase):
    """L{parse_retry_after} reads delay-seconds and HTTP dates."""

    NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()

    def http_date(self, offset: float) -> str:
        when = datetime.fromtimestamp(self.NOW + offset, timezone.utc)
        return format_datetime(when, usegmt=True)

    def test_seconds(self) -> None:
        self.assertEqual(parse_retry_after("120", self.NOW), 120.0)
        self.assertEqual(parse_retry_after("0", self.NOW), 0.0)
        self.assertEqual(parse_retry_after(" 5 ", self.NOW), 5.0)

    def test_absent(self) -> None:
        self.assertIsNone(parse_retry_after(None, self.NOW))
        self.assertIsNone(parse_retry_after("", self.NOW))

    def test_http_date(self) -> None:
        value = self.http_date(30)
        self.assertEqual(value, "Wed, 01 May 2024 12:00:30 GMT")
        self.assertEqual(parse_retry_after(value, self.NOW), 30.0)

    def test_http_date_other_forms(self) -> None:
        """RFC 850 dates are HTTP dates too (asctime: see below)."""
        self.assertEqual(parse_retry_after("Wednesday, 01-May-24 12:01:00 GMT", self.NOW), 60.0)

    def test_http_date_without_zone_is_gmt(self) -> None:
        """
        HTTP dates are GMT even when they do not say so (asctime form,
        C{-0000}); the host's local timezone must not matter. Simulated by
        making naive datetimes from the parser behave as on a host at UTC-4.
        """
        real = retry.parsedate_to_datetime

        class NewYorkTime(datetime):
            def timestamp(self) -> float:
                if self.tzinfo is None:
                    return self.replace(tzinfo=timezone(timedelta(hours=-4))).timestamp()
                return super().timestamp()

        def parse_on_new_york_host(value: str) -> datetime:
            parsed = real(value)
            return NewYorkTime(*parsed.timetuple()[:6], tzinfo=parsed.tzinfo)

        self.patch(retry, "parsedate_to_datetime", parse_on_new_york_host)
        self.assertEqual(parse_retry_after(self.http_date(30), self.NOW), 30.0)
        self.assertEqual(parse_retry_after("Wed May  1 12:00:10 2024", self.NOW), 10.0)
        self.assertEqual(parse_retry_after("Wed, 01 May 2024 12:00:10 -0000", self.NOW), 10.0)

    def test_http_date_in_past(self) -> None:
        self.assertEqual(parse_retry_after(self.http_date(-3600), self.NOW), 0.0)

    def test_unparseable(self) -> None:
        for value in ("soon", "-5", "1.5", "1e3", "Wed, 99 Foo 2024", "\x00", "12 34"):
            self.assertIsNone(parse_retry_after(value, self.NOW), repr(value))

    def test_non_ascii_digits(self) -> None:
        """
        The client decodes headers as Latin-1, so a byte such as C{0xB2}
        arrives as C{"²"}, which C{str.isdigit} accepts but C{float} does
        not: unparseable input must give L{None}, not an exception.
        """
        for value in (b"\xb2".decode("latin-1"), "\u00b9", "1\u00b3"):
            self.assertIsNone(parse_retry_after(value, self.NOW), repr(value))

    def test_huge_seconds_stop_retrying(self) -> None:
        value = parse_retry_after("9" * 400, self.NOW)
        assert value is not None
        self.assertIsNone(RetryPolicy().delay(0, value))


class SleepTests(SynchronousTestCase):
    """L{sleep} waits on the given clock and can be cancelled."""

    def test_fires_after_delay(self) -> None:
        clock = Clock()
        d = sleep(clock, 2.5)
        clock.advance(2.4)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))

    def test_zero(self) -> None:
        clock = Clock()
        d = sleep(clock, 0)
        self.assertNoResult(d)
        clock.advance(0)
        self.assertIsNone(self.successResultOf(d))

    def test_cancel(self) -> None:
        clock = Clock()
        d = sleep(clock, 10)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])

"""
Tests for L{hammal.cluster.lease}: per-digest fill leases on a fake Redis
driven by L{task.Clock} (the same contract is checked against a real
redis-server in L{tests.cluster.test_lease_redis}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.cluster.lease import KEY_PREFIX, FillLeases, HeldElsewhere, Lease
from tests.cluster.fakes import FakeRedis

DIGEST = "sha256:" + "ab" * 32
KEY = KEY_PREFIX + DIGEST
A = "http://10.0.0.1:5001"
B = "http://10.0.0.2:5001"


class FillLeaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.a = FillLeases(self.redis, self.clock, A, ttl=9.0)
        self.b = FillLeases(self.redis, self.clock, B, ttl=9.0)

    def acquire(self, leases: FillLeases, digest: str = DIGEST) -> Any:
        return self.successResultOf(leases.acquire(digest))

    def test_first_instance_takes_the_lease(self) -> None:
        """SET NX PX stores the holder's URL with the TTL."""
        lease = self.acquire(self.a)
        self.assertIsInstance(lease, Lease)
        self.assertTrue(lease.shared)
        self.assertEqual(self.redis.data[KEY][0], A)
        self.assertEqual(self.redis.ttl(KEY), 9.0)
        self.assertIn(("set", KEY, A, 9000, True), self.redis.calls)

    def test_second_instance_learns_the_holder(self) -> None:
        self.acquire(self.a)
        held = self.acquire(self.b)
        self.assertEqual(held, HeldElsewhere(DIGEST, A))
        self.assertEqual(self.successResultOf(self.b.holder(DIGEST)), A)

    def test_no_holder(self) -> None:
        self.assertIsNone(self.successResultOf(self.a.holder(DIGEST)))

    def test_digests_are_independent(self) -> None:
        self.assertIsInstance(self.acquire(self.a), Lease)
        self.assertIsInstance(self.acquire(self.b, "sha256:" + "cd" * 32), Lease)

    def test_renewed_while_the_fill_runs(self) -> None:
        """The lease outlives its TTL while held: renewal every TTL/3."""
        lease = self.acquire(self.a)
        for _ in range(10):
            self.clock.advance(3.0)
        self.assertEqual(self.successResultOf(self.b.holder(DIGEST)), A)
        self.assertEqual(self.redis.ttl(KEY), 9.0)
        self.assertFalse(lease.lost)

    def test_release_lets_another_instance_in(self) -> None:
        lease = self.acquire(self.a)
        self.successResultOf(lease.release())
        self.assertNotIn(KEY, self.redis.data)
        self.assertIsInstance(self.acquire(self.b), Lease)
        # Released: no more renewals.
        calls = len(self.redis.calls)
        self.clock.advance(30)
        self.assertEqual(len(self.redis.calls), calls + 1)  # b renews; a stopped
        self.assertEqual(self.redis.calls[-1][0], "eval")
        self.assertEqual(self.redis.calls[-1][3][0], B)

    def test_dead_holder_expires_and_another_takes_over(self) -> None:
        """A holder that stops renewing (killed) loses the digest after the TTL."""
        lease = self.acquire(self.a)
        lease._stop_renewing()  # what kill -9 does to the renewal loop
        self.clock.advance(8.9)
        self.assertIsInstance(self.acquire(self.b), HeldElsewhere)
        self.clock.advance(0.2)
        self.assertIsInstance(self.acquire(self.b), Lease)
        self.assertEqual(self.redis.data[KEY][0], B)

    def test_renewal_never_extends_another_instances_lease(self) -> None:
        lost: list[Lease] = []
        lease = self.acquire(self.a)
        lease.on_lost(lost.append)
        # a's lease expired while it was stalled; b took the digest.
        self.redis.data[KEY] = (B, self.clock.seconds() + 9.0)
        self.clock.advance(3.0)
        self.assertEqual(lost, [lease])
        self.assertTrue(lease.lost)
        self.assertEqual(self.redis.data[KEY][0], B)
        self.assertEqual(self.redis.ttl(KEY), 6.0)
        # Release does not delete b's lease either.
        self.successResultOf(lease.release())
        self.assertEqual(self.redis.data[KEY][0], B)

    def test_release_is_compare_and_delete(self) -> None:
        lease = self.acquire(self.a)
        self.redis.data[KEY] = (B, None)
        self.successResultOf(lease.release())
        self.assertEqual(self.redis.data[KEY][0], B)

    def test_restarted_instance_adopts_its_old_lease(self) -> None:
        """A lease left by a killed run of this instance is not waited out."""
        old = self.acquire(self.a)
        old._stop_renewing()  # killed
        self.clock.advance(4.0)
        restarted = FillLeases(self.redis, self.clock, A, ttl=9.0)
        lease = self.acquire(restarted)
        self.assertIsInstance(lease, Lease)
        self.assertTrue(lease.shared)
        self.assertEqual(self.redis.ttl(KEY), 9.0)
        self.clock.advance(6.0)
        self.assertEqual(self.redis.ttl(KEY), 9.0)  # renewed at 7 and 10, not 3 left
        self.assertIsInstance(self.acquire(self.b), HeldElsewhere)

    def test_same_process_does_not_fill_twice(self) -> None:
        first = self.acquire(self.a)
        self.assertEqual(self.acquire(self.a), HeldElsewhere(DIGEST, A))
        self.successResultOf(first.release())
        self.assertIsInstance(self.acquire(self.a), Lease)

    def test_adoption_races_lose_cleanly(self) -> None:
        """If the old lease changed hands between SET and adoption, no lease is taken."""
        self.redis.data[KEY] = (A, 5.0)
        restarted = FillLeases(self.redis, self.clock, A, ttl=9.0)
        real_eval = self.redis.eval

        def handed_over(script: str, keys: list[str], args: list[Any]) -> Any:
            self.redis.data[KEY] = (B, 9.0)
            return real_eval(script, keys, args)

        self.redis.eval = handed_over  # type: ignore[method-assign]
        held = self.acquire(restarted)
        self.assertEqual(held, HeldElsewhere(DIGEST, B))
        self.assertEqual(self.redis.data[KEY][0], B)

    def test_release_twice(self) -> None:
        lease = self.acquire(self.a)
        self.successResultOf(lease.release())
        self.successResultOf(lease.release())
        self.assertEqual([c[0] for c in self.redis.calls], ["set", "eval"])


class DegradedTests(SynchronousTestCase):
    """Losing Redis means local leases (single-flight per node), never errors."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.leases = FillLeases(self.redis, self.clock, A, ttl=9.0, timeout=1.0, retry_after=5.0)

    def test_redis_down(self) -> None:
        self.redis.down = True
        lease = self.successResultOf(self.leases.acquire(DIGEST))
        self.assertIsInstance(lease, Lease)
        self.assertFalse(lease.shared)
        self.assertFalse(self.leases.healthy)
        self.assertIsNone(self.successResultOf(self.leases.holder(DIGEST)))
        self.successResultOf(lease.release())

    def test_redis_left_alone_after_a_failure(self) -> None:
        self.redis.down = True
        self.successResultOf(self.leases.acquire(DIGEST))
        calls = len(self.redis.calls)
        self.successResultOf(self.leases.acquire(DIGEST))
        self.successResultOf(self.leases.holder(DIGEST))
        self.assertEqual(len(self.redis.calls), calls)
        # After retry_after, Redis is tried again and, back, shared again.
        self.redis.down = False
        self.clock.advance(5.0)
        lease = self.successResultOf(self.leases.acquire(DIGEST))
        self.assertTrue(lease.shared)
        self.assertTrue(self.leases.healthy)

    def test_redis_that_never_answers_is_bounded(self) -> None:
        self.redis.hang = True
        d = self.leases.acquire(DIGEST)
        self.assertNoResult(d)
        self.clock.advance(1.0)
        lease = self.successResultOf(d)
        self.assertFalse(lease.shared)

    def test_outage_during_the_fill(self) -> None:
        """Renewals that fail are not a lost lease; they resume after the outage."""
        leases = FillLeases(self.redis, self.clock, A, ttl=9.0, retry_after=2.0)
        lease = self.successResultOf(leases.acquire(DIGEST))
        self.redis.down = True
        self.clock.advance(3.0)
        self.assertFalse(lease.lost)
        self.assertFalse(leases.healthy)
        self.redis.down = False
        self.clock.advance(3.0)
        self.assertEqual(self.redis.ttl(KEY_PREFIX + DIGEST), 9.0)
        self.assertFalse(lease.lost)
        self.assertTrue(leases.healthy)

    def test_outage_longer_than_the_ttl_loses_the_lease(self) -> None:
        lost: list[Lease] = []
        lease = self.successResultOf(self.leases.acquire(DIGEST))
        lease.on_lost(lost.append)
        self.redis.down = True
        self.clock.advance(3.0)
        self.redis.down = False
        self.clock.advance(6.0)
        self.assertEqual(lost, [lease])

    def test_without_redis(self) -> None:
        leases = FillLeases(None, self.clock, A)
        lease = self.successResultOf(leases.acquire(DIGEST))
        self.assertFalse(lease.shared)
        self.assertIsNone(self.successResultOf(leases.holder(DIGEST)))

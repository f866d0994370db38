"""
L{hammal.cluster.lease} against a real redis-server: the SET NX PX lease,
the Lua compare-and-pexpire and compare-and-delete scripts, expiry of a
dead holder's lease, and Redis dying under the leases.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from hammal.cluster.lease import KEY_PREFIX, FillLeases, HeldElsewhere, Lease
from tests.cluster.harness import require_binaries
from tests.integration.environment import REDIS_BIN, RedisServer, make_tempdir

DIGEST = "sha256:" + "5e" * 32
A = "http://127.0.0.1:1/a"
B = "http://127.0.0.1:2/b"
TTL = 0.6


def _sleep(seconds: float) -> Any:
    return deferLater(reactor, seconds, lambda: None)


class RedisLeaseTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_binaries(REDIS_BIN)
        self.server = RedisServer(make_tempdir("hammal-lease-")).start()
        self.addCleanup(self.server.stop)
        self.server.wait_ready()
        self.pools: list[Any] = []

    def tearDown(self) -> Any:
        for pool in self.pools:
            pool.disconnect()

    def leases(self, advertise: str, **kwargs: Any) -> FillLeases:
        pool = txredisapi.lazyConnectionPool(
            host="127.0.0.1",
            port=self.server.port,
            poolsize=2,
            reconnect=True,
            connectTimeout=1,
            replyTimeout=1,
        )
        self.pools.append(pool)
        kwargs.setdefault("ttl", TTL)
        return FillLeases(pool, reactor, advertise, **kwargs)

    @inlineCallbacks
    def test_one_holder_renewed_then_released(self) -> Any:
        a, b = self.leases(A), self.leases(B)
        lease = yield a.acquire(DIGEST)
        self.assertIsInstance(lease, Lease)
        self.assertTrue(lease.shared)
        held = yield b.acquire(DIGEST)
        self.assertEqual(held, HeldElsewhere(DIGEST, A))
        # Three TTLs later the renewals kept it.
        yield _sleep(3 * TTL)
        self.assertEqual((yield b.holder(DIGEST)), A)
        self.assertFalse(lease.lost)
        pttl = int(self.server.command("PTTL", KEY_PREFIX + DIGEST)[1:].split(b"\r")[0])
        self.assertTrue(0 < pttl <= TTL * 1000, pttl)
        yield lease.release()
        self.assertEqual(self.server.keys("hammal:v1:lease:*"), [])
        taken = yield b.acquire(DIGEST)
        self.assertIsInstance(taken, Lease)
        self.assertEqual((yield a.holder(DIGEST)), B)
        yield taken.release()

    @inlineCallbacks
    def test_dead_holder_expires(self) -> Any:
        a, b = self.leases(A), self.leases(B)
        lease = yield a.acquire(DIGEST)
        lease._stop_renewing()  # the holder was killed
        self.assertIsInstance((yield b.acquire(DIGEST)), HeldElsewhere)
        yield _sleep(TTL + 0.2)
        taken = yield b.acquire(DIGEST)
        self.assertIsInstance(taken, Lease)
        yield taken.release()

    @inlineCallbacks
    def test_restarted_instance_adopts_its_lease(self) -> Any:
        old = yield self.leases(A).acquire(DIGEST)
        old._stop_renewing()  # killed
        restarted = self.leases(A)
        lease = yield restarted.acquire(DIGEST)
        self.assertIsInstance(lease, Lease)
        self.assertTrue(lease.shared)
        yield _sleep(2 * TTL)
        self.assertEqual((yield self.leases(B).acquire(DIGEST)), HeldElsewhere(DIGEST, A))
        yield lease.release()

    @inlineCallbacks
    def test_scripts_leave_another_holders_lease_alone(self) -> Any:
        a = self.leases(A)
        lost: list[Lease] = []
        lease = yield a.acquire(DIGEST)
        lease.on_lost(lost.append)
        self.server.command("SET", KEY_PREFIX + DIGEST, B)  # no TTL: renewal must not add one
        yield _sleep(TTL)
        self.assertEqual(lost, [lease])
        self.assertEqual(self.server.command("PTTL", KEY_PREFIX + DIGEST), b":-1\r\n")
        yield lease.release()
        expected = b"$%d\r\n%s\r\n" % (len(B), B.encode())
        self.assertEqual(self.server.command("GET", KEY_PREFIX + DIGEST), expected)

    @inlineCallbacks
    def test_losing_redis_means_local_leases(self) -> Any:
        a = self.leases(A, retry_after=0.5)
        first = yield a.acquire(DIGEST)
        self.assertTrue(first.shared)
        self.server.kill()
        local = yield a.acquire("sha256:" + "77" * 32)
        self.assertIsInstance(local, Lease)
        self.assertFalse(local.shared)
        self.assertIsNone((yield a.holder(DIGEST)))
        yield first.release()
        yield local.release()
        # Back (empty): shared again once retry_after has passed.
        self.server.restart()
        yield _sleep(1.5)
        again = yield a.acquire(DIGEST)
        self.assertTrue(again.shared, "still local after Redis came back")
        yield again.release()

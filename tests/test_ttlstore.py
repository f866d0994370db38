"""
Tests for L{hammal.ttlstore}: one cache contract run against every
implementation, then what is particular to each.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hammal.ttlstore import (
    KEY_PREFIX,
    MemoryTtlStore,
    RedisTtlStore,
    ResilientTtlStore,
    TtlStore,
)


class RedisDown(ConnectionError):
    """What the fake Redis fails with while it is down."""


class FakeRedis:
    """
    An in-memory stand-in for a txredisapi connection: C{get}, C{set} with
    C{pexpire} (milliseconds, on C{clock}) and C{delete}, all returning
    L{Deferred}s.

    @ivar down: fail every call with L{RedisDown}.
    @ivar hang: answer no call (until cancelled).
    @ivar calls: the names of the methods called, in order.
    @ivar cancelled: the names of the hanging calls that were cancelled.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float | None]] = {}
        self.down = False
        self.hang = False
        self.calls: list[str] = []
        self.cancelled: list[str] = []

    def _answer(self, method: str, compute: Any) -> Deferred[Any]:
        self.calls.append(method)
        if self.hang:
            return Deferred(lambda _: self.cancelled.append(method))
        if self.down:
            return fail(RedisDown("Connection refused"))
        return succeed(compute())

    def get(self, key: str) -> Deferred[str | None]:
        def compute() -> str | None:
            entry = self.data.get(key)
            if entry is None:
                return None
            value, expires = entry
            if expires is not None and self.clock.seconds() >= expires:
                del self.data[key]
                return None
            return value

        return self._answer("get", compute)

    def set(self, key: str, value: str, pexpire: int | None = None) -> Deferred[str]:
        def compute() -> str:
            expires = None if pexpire is None else self.clock.seconds() + pexpire / 1000
            self.data[key] = (value, expires)
            return "OK"

        return self._answer("set", compute)

    def delete(self, key: str) -> Deferred[int]:
        return self._answer("delete", lambda: int(self.data.pop(key, None) is not None))


class TtlStoreContractMixin:
    """
    The L{TtlStore} contract. Mixed into a L{SynchronousTestCase} whose
    C{setUp} sets C{self.clock} and C{self.cache}.
    """

    clock: Clock
    cache: TtlStore

    # Provided by SynchronousTestCase.
    successResultOf: Any
    assertEqual: Any
    assertIsNone: Any

    def get(self, key: str) -> str | None:
        result: str | None = self.successResultOf(self.cache.get(key))
        return result

    def test_missing(self) -> None:
        self.assertIsNone(self.get("nothing"))

    def test_set_get(self) -> None:
        self.assertIsNone(self.successResultOf(self.cache.set("k", "token-1", 60)))
        self.assertEqual(self.get("k"), "token-1")

    def test_overwrite(self) -> None:
        self.successResultOf(self.cache.set("k", "old", 60))
        self.successResultOf(self.cache.set("k", "new", 60))
        self.assertEqual(self.get("k"), "new")

    def test_keys_independent(self) -> None:
        self.successResultOf(self.cache.set("a", "token-a", 60))
        self.successResultOf(self.cache.set("b", "token-b", 60))
        self.assertEqual((self.get("a"), self.get("b")), ("token-a", "token-b"))
        self.successResultOf(self.cache.delete("a"))
        self.assertEqual((self.get("a"), self.get("b")), (None, "token-b"))

    def test_delete(self) -> None:
        self.successResultOf(self.cache.set("k", "token", 60))
        self.assertIsNone(self.successResultOf(self.cache.delete("k")))
        self.assertIsNone(self.get("k"))

    def test_delete_missing(self) -> None:
        self.assertIsNone(self.successResultOf(self.cache.delete("never-set")))

    def test_expiry(self) -> None:
        """A token lives exactly C{ttl} seconds."""
        self.successResultOf(self.cache.set("k", "token", 10))
        self.clock.advance(9.9)
        self.assertEqual(self.get("k"), "token")
        self.clock.advance(0.1)
        self.assertIsNone(self.get("k"))

    def test_overwrite_renews_ttl(self) -> None:
        self.successResultOf(self.cache.set("k", "one", 10))
        self.clock.advance(8)
        self.successResultOf(self.cache.set("k", "two", 10))
        self.clock.advance(8)
        self.assertEqual(self.get("k"), "two")

    def test_keys_expire_separately(self) -> None:
        self.successResultOf(self.cache.set("short", "s", 1))
        self.successResultOf(self.cache.set("long", "l", 100))
        self.clock.advance(50)
        self.assertEqual((self.get("short"), self.get("long")), (None, "l"))

    def test_arbitrary_keys(self) -> None:
        key = "0123abcd:user-ff:repository:library/alpine:pull"
        self.successResultOf(self.cache.set(key, "t\u00f6ken", 5))
        self.assertEqual(self.get(key), "t\u00f6ken")


class MemoryTtlStoreContractTests(TtlStoreContractMixin, SynchronousTestCase):
    """L{MemoryTtlStore} honours the contract."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = MemoryTtlStore(self.clock)


class RedisTtlStoreContractTests(TtlStoreContractMixin, SynchronousTestCase):
    """L{RedisTtlStore} honours the contract (against L{FakeRedis})."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = RedisTtlStore(FakeRedis(self.clock), self.clock)


class ResilientTtlStoreContractTests(TtlStoreContractMixin, SynchronousTestCase):
    """L{ResilientTtlStore} over a healthy Redis honours the contract."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = ResilientTtlStore(
            RedisTtlStore(FakeRedis(self.clock), self.clock), MemoryTtlStore(self.clock), self.clock
        )


class ResilientDownContractTests(TtlStoreContractMixin, SynchronousTestCase):
    """L{ResilientTtlStore} honours the contract with Redis down all along."""

    def setUp(self) -> None:
        self.clock = Clock()
        redis = FakeRedis(self.clock)
        redis.down = True
        self.cache = ResilientTtlStore(
            RedisTtlStore(redis, self.clock), MemoryTtlStore(self.clock), self.clock
        )
        self.patch(
            ResilientTtlStore, "log", Logger(observer=cast(ILogObserver, lambda event: None))
        )


class MemoryTtlStoreTests(SynchronousTestCase):
    """L{MemoryTtlStore} is bounded, dropping the least recently used."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_lru_bound(self) -> None:
        cache = MemoryTtlStore(self.clock, max_entries=2)
        cache.set("a", "A", 60)
        cache.set("b", "B", 60)
        self.assertEqual(self.successResultOf(cache.get("a")), "A")
        cache.set("c", "C", 60)
        self.assertIsNone(self.successResultOf(cache.get("b")))
        self.assertEqual(self.successResultOf(cache.get("a")), "A")
        self.assertEqual(self.successResultOf(cache.get("c")), "C")

    def test_set_refreshes_recency(self) -> None:
        cache = MemoryTtlStore(self.clock, max_entries=2)
        cache.set("a", "A", 60)
        cache.set("b", "B", 60)
        cache.set("a", "A2", 60)
        cache.set("c", "C", 60)
        self.assertIsNone(self.successResultOf(cache.get("b")))
        self.assertEqual(self.successResultOf(cache.get("a")), "A2")

    def test_never_exceeds_bound(self) -> None:
        cache = MemoryTtlStore(self.clock, max_entries=3)
        for i in range(100):
            cache.set(f"k{i}", str(i), 60)
        present = [i for i in range(100) if self.successResultOf(cache.get(f"k{i}")) is not None]
        self.assertEqual(present, [97, 98, 99])

    def test_default_bound(self) -> None:
        cache = MemoryTtlStore(self.clock)
        for i in range(10001):
            cache.set(f"k{i}", "t", 60)
        self.assertIsNone(self.successResultOf(cache.get("k0")))
        self.assertEqual(self.successResultOf(cache.get("k1")), "t")

    def test_zero_ttl(self) -> None:
        cache = MemoryTtlStore(self.clock)
        cache.set("k", "t", 0)
        self.assertIsNone(self.successResultOf(cache.get("k")))


class RedisTtlStoreTests(SynchronousTestCase):
    """L{RedisTtlStore} namespaces keys, uses TTLs and times out."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.cache = RedisTtlStore(self.redis, self.clock, timeout=1.0)

    def test_namespaced_key_and_pexpire(self) -> None:
        self.successResultOf(self.cache.set("k", "token", 2.5))
        self.assertEqual(self.redis.data, {KEY_PREFIX + "k": ("token", 2.5)})
        self.assertTrue(KEY_PREFIX.startswith("hammal:token:v"))

    def test_pexpire_at_least_one_millisecond(self) -> None:
        """A tiny TTL must not become C{PX 0}, which Redis rejects."""
        calls: list[tuple[str, str, int]] = []

        class Recorder:
            def set(self, key: str, value: str, pexpire: int) -> Deferred[str]:
                calls.append((key, value, pexpire))
                return succeed("OK")

        RedisTtlStore(Recorder(), self.clock).set("k", "t", 0.0001)
        RedisTtlStore(Recorder(), self.clock).set("k", "t", 12.3456)
        self.assertEqual([c[2] for c in calls], [1, 12345])

    def test_reads_other_instances_tokens(self) -> None:
        self.redis.data[KEY_PREFIX + "k"] = ("shared-token", None)
        self.assertEqual(self.successResultOf(self.cache.get("k")), "shared-token")

    def test_empty_value_is_missing(self) -> None:
        self.redis.data[KEY_PREFIX + "k"] = ("", None)
        self.assertIsNone(self.successResultOf(self.cache.get("k")))

    def test_delete_namespaced(self) -> None:
        self.redis.data[KEY_PREFIX + "k"] = ("t", None)
        self.redis.data["k"] = ("foreign", None)
        self.successResultOf(self.cache.delete("k"))
        self.assertEqual(self.redis.data, {"k": ("foreign", None)})

    def test_failure_propagates(self) -> None:
        self.redis.down = True
        self.failureResultOf(self.cache.get("k"), RedisDown)
        self.failureResultOf(self.cache.set("k", "t", 1), RedisDown)
        self.failureResultOf(self.cache.delete("k"), RedisDown)

    def test_timeout(self) -> None:
        """A Redis call unanswered for C{timeout} seconds is cancelled and fails."""
        self.redis.hang = True
        calls: list[Any] = [
            lambda: self.cache.get("k"),
            lambda: self.cache.set("k", "t", 1),
            lambda: self.cache.delete("k"),
        ]
        for call in calls:
            d = call()
            self.clock.advance(0.999)
            self.assertNoResult(d)
            self.clock.advance(0.001)
            self.failureResultOf(d, TimeoutError)
        self.assertEqual(self.redis.cancelled, ["get", "set", "delete"])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ResilientTtlStoreTests(SynchronousTestCase):
    """
    L{ResilientTtlStore} keeps working on its local cache while Redis
    fails, says so once, and notices Redis coming back.
    """

    RETRY_AFTER = 5.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.local = MemoryTtlStore(self.clock)
        self.cache = ResilientTtlStore(
            RedisTtlStore(self.redis, self.clock, timeout=1.0),
            self.local,
            self.clock,
            retry_after=self.RETRY_AFTER,
        )
        self.events: list[dict[str, Any]] = []
        self.patch(
            ResilientTtlStore, "log", Logger(observer=cast(ILogObserver, self.events.append))
        )

    def messages(self, level: LogLevel) -> list[str]:
        """The formatted log messages at C{level}."""
        return [formatEvent(e) for e in self.events if e["log_level"] == level]

    def redis_calls(self) -> int:
        return len(self.redis.calls)

    def test_set_writes_both(self) -> None:
        self.successResultOf(self.cache.set("k", "t", 30))
        self.assertEqual(self.successResultOf(self.local.get("k")), "t")
        self.assertEqual(self.redis.data[KEY_PREFIX + "k"][0], "t")
        self.assertTrue(self.cache.shared_healthy)
        self.assertEqual(self.events, [])

    def test_local_first(self) -> None:
        """A token held locally is served without asking Redis."""
        self.successResultOf(self.cache.set("k", "t", 30))
        before = self.redis_calls()
        self.assertEqual(self.successResultOf(self.cache.get("k")), "t")
        self.assertEqual(self.redis_calls(), before)

    def test_shared_token(self) -> None:
        """A token another instance stored in Redis is found."""
        self.redis.data[KEY_PREFIX + "k"] = ("from-peer", None)
        self.assertEqual(self.successResultOf(self.cache.get("k")), "from-peer")

    def test_delete_both(self) -> None:
        self.successResultOf(self.cache.set("k", "t", 30))
        self.successResultOf(self.cache.delete("k"))
        self.assertIsNone(self.successResultOf(self.local.get("k")))
        self.assertNotIn(KEY_PREFIX + "k", self.redis.data)

    def test_failure_falls_back(self) -> None:
        self.successResultOf(self.cache.set("k", "t", 30))
        self.redis.down = True
        self.assertEqual(self.successResultOf(self.cache.get("k")), "t")
        self.assertIsNone(self.successResultOf(self.cache.get("missing")))
        self.assertIsNone(self.successResultOf(self.cache.set("k2", "t2", 30)))
        self.assertEqual(self.successResultOf(self.cache.get("k2")), "t2")
        self.assertIsNone(self.successResultOf(self.cache.delete("k2")))
        self.assertIsNone(self.successResultOf(self.cache.get("k2")))
        self.assertFalse(self.cache.shared_healthy)

    def test_one_warning(self) -> None:
        """However many calls fail, one warning is logged per outage."""
        self.redis.down = True
        for _ in range(3):
            for i in range(5):
                self.successResultOf(self.cache.get(f"missing{i}"))
                self.successResultOf(self.cache.set(f"k{i}", "t", 60))
            self.clock.advance(self.RETRY_AFTER)
        warnings = self.messages(LogLevel.warn)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("redis", warnings[0])
        self.assertIn("Connection refused", warnings[0])
        self.assertEqual(self.messages(LogLevel.info), [])

    def test_skipped_while_down(self) -> None:
        """Redis is left alone for C{retry_after} seconds after a failure."""
        self.redis.down = True
        self.successResultOf(self.cache.get("a"))
        self.assertEqual(self.redis_calls(), 1)
        self.clock.advance(self.RETRY_AFTER - 0.01)
        self.successResultOf(self.cache.get("a"))
        self.successResultOf(self.cache.set("a", "t", 60))
        self.successResultOf(self.cache.delete("a"))
        self.assertEqual(self.redis_calls(), 1)
        self.clock.advance(0.01)
        self.successResultOf(self.cache.get("b"))
        self.assertEqual(self.redis_calls(), 2)

    def test_failing_again_extends(self) -> None:
        self.redis.down = True
        self.successResultOf(self.cache.get("a"))
        self.clock.advance(self.RETRY_AFTER)
        self.successResultOf(self.cache.get("a"))
        self.assertEqual(self.redis_calls(), 2)
        self.clock.advance(self.RETRY_AFTER - 0.01)
        self.successResultOf(self.cache.get("a"))
        self.assertEqual(self.redis_calls(), 2)

    def test_return_logged(self) -> None:
        self.redis.down = True
        self.successResultOf(self.cache.get("a"))
        self.redis.down = False
        self.clock.advance(self.RETRY_AFTER)
        self.redis.data[KEY_PREFIX + "a"] = ("back", None)
        self.assertEqual(self.successResultOf(self.cache.get("a")), "back")
        self.assertTrue(self.cache.shared_healthy)
        infos = self.messages(LogLevel.info)
        self.assertEqual(len(infos), 1, infos)
        self.assertIn("redis", infos[0])
        self.assertIn("reachable again", infos[0])
        self.successResultOf(self.cache.get("a"))
        self.successResultOf(self.cache.set("b", "t", 60))
        self.assertEqual(len(self.messages(LogLevel.info)), 1)

    def test_second_outage_warns_again(self) -> None:
        self.redis.down = True
        self.successResultOf(self.cache.get("a"))
        self.redis.down = False
        self.clock.advance(self.RETRY_AFTER)
        self.successResultOf(self.cache.get("a"))
        self.redis.down = True
        self.successResultOf(self.cache.get("a"))
        self.assertEqual(len(self.messages(LogLevel.warn)), 2)

    def test_timeout_falls_back(self) -> None:
        """A Redis that does not answer counts as failed after the timeout."""
        self.successResultOf(self.local.set("held", "local-token", 60))
        self.redis.hang = True
        d = self.cache.get("k")
        s = self.cache.set("k2", "t2", 60)
        self.assertNoResult(d)
        self.assertNoResult(s)
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(s))
        self.assertEqual(len(self.messages(LogLevel.warn)), 1)
        self.assertIn("redis", self.messages(LogLevel.warn)[0])
        self.assertFalse(self.cache.shared_healthy)
        calls = self.redis_calls()
        self.assertEqual(self.successResultOf(self.cache.get("k2")), "t2")
        self.assertEqual(self.successResultOf(self.cache.get("held")), "local-token")
        self.assertIsNone(self.successResultOf(self.cache.get("k")))
        self.assertEqual(self.redis_calls(), calls)

    def test_deleted_token_stays_deleted_after_outage(self) -> None:
        """
        A token deleted while Redis was down (upstream rejected it) must not
        come back from Redis once it recovers.
        """
        self.successResultOf(self.cache.set("k", "rejected", 300))
        self.redis.down = True
        self.successResultOf(self.cache.delete("k"))
        self.redis.down = False
        self.clock.advance(self.RETRY_AFTER)
        self.assertIsNone(self.successResultOf(self.cache.get("k")))

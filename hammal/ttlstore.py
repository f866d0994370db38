"""
Small values that expire: one L{TtlStore} contract, an in-process and a
Redis implementation, and a resilient pairing of both.

Upstream bearer tokens (``hammal:token:v1:...``) and the manifest cache's
tag entries (``hammal:tag:v1:...``) live in these stores. Every
implementation expires entries by itself: the memory store on its injected
clock, Redis through key TTLs.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

KEY_PREFIX = "hammal:token:v1:"
TAG_KEY_PREFIX = "hammal:tag:v1:"

#: How long a deletion made during an outage is remembered.
TOMBSTONE_SECONDS = 3600.0


class TtlStore(Protocol):
    """
    Short strings kept for a time: upstream bearer tokens until shortly
    before they expire, tag entries for the manifest cache.
    """

    def get(self, key: str) -> Deferred[str | None]:
        """The value stored under C{key}, or L{None}."""

    def set(self, key: str, token: str, ttl: float) -> Deferred[None]:
        """Store C{token} (any value) under C{key} for C{ttl} seconds."""

    def delete(self, key: str) -> Deferred[None]:
        """Forget C{key}."""


class MemoryTtlStore:
    """
    A bounded in-process L{TtlStore}; the least recently used entry goes
    when it is full.
    """

    def __init__(self, clock: IReactorTime, max_entries: int = 10000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def get(self, key: str) -> Deferred[str | None]:
        entry = self._entries.get(key)
        if entry is None:
            return succeed(None)
        token, expires = entry
        if self._clock.seconds() >= expires:
            del self._entries[key]
            return succeed(None)
        self._entries.move_to_end(key)
        return succeed(token)

    def set(self, key: str, token: str, ttl: float) -> Deferred[None]:
        self._entries[key] = (token, self._clock.seconds() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return succeed(None)

    def delete(self, key: str) -> Deferred[None]:
        self._entries.pop(key, None)
        return succeed(None)


class RedisTtlStore:
    """
    A L{TtlStore} in Redis, shared by every hammal instance using it.

    @param redis: a txredisapi connection or pool.
    @param timeout: seconds before a Redis call counts as failed.
    """

    def __init__(
        self, redis: Any, clock: IReactorTime, timeout: float = 1.0, prefix: str = KEY_PREFIX
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._timeout = timeout
        self._prefix = prefix

    def _call(self, d: Deferred[Any]) -> Deferred[Any]:
        return d.addTimeout(self._timeout, self._clock)

    def get(self, key: str) -> Deferred[str | None]:
        d = self._call(self._redis.get(self._prefix + key))
        return d.addCallback(lambda value: value if value else None)

    def set(self, key: str, token: str, ttl: float) -> Deferred[None]:
        milliseconds = max(1, int(ttl * 1000))
        d = self._call(self._redis.set(self._prefix + key, token, pexpire=milliseconds))
        return d.addCallback(lambda _: None)

    def delete(self, key: str) -> Deferred[None]:
        d = self._call(self._redis.delete(self._prefix + key))
        return d.addCallback(lambda _: None)


class ResilientTtlStore:
    """
    A shared L{TtlStore} backed by a local one: hammal keeps serving when
    the shared cache (Redis) fails.

    Every token is also kept locally. When the shared cache fails, one
    warning is logged and it is left alone for C{retry_after} seconds; the
    first success after that logs its return.
    """

    log = Logger()

    def __init__(
        self,
        shared: TtlStore,
        local: TtlStore,
        clock: IReactorTime,
        retry_after: float = 5.0,
        name: str = "redis",
    ) -> None:
        self._shared = shared
        self._local = local
        self._clock = clock
        self._retry_after = retry_after
        self._name = name
        self._down_until: float | None = None
        # Keys deleted while the shared cache was unreachable: its copy
        # must not come back when it does.
        self._tombstones: dict[str, float] = {}

    @property
    def shared_healthy(self) -> bool:
        """Whether the shared cache answered its last call."""
        return self._down_until is None

    def _usable(self) -> bool:
        return self._down_until is None or self._clock.seconds() >= self._down_until

    def _succeeded(self, result: Any) -> Any:
        if self._down_until is not None:
            self._down_until = None
            self.log.info("{cache} token cache is reachable again", cache=self._name)
        return result

    def _failed(self, failure: Any, fallback: Any) -> Any:
        if self._down_until is None:
            self.log.warn(
                "{cache} token cache failed ({error}); using the in-process cache",
                cache=self._name,
                error=failure.getErrorMessage() or failure.type.__name__,
            )
        self._down_until = self._clock.seconds() + self._retry_after
        return fallback

    async def _get(self, key: str) -> str | None:
        local = await self._local.get(key)
        if local is not None or not self._usable():
            return local
        if key in self._tombstones:
            if self._tombstones[key] > self._clock.seconds():
                await self.delete(key)
                if key in self._tombstones:
                    return None
            else:
                del self._tombstones[key]
        d = self._shared.get(key).addCallbacks(self._succeeded, self._failed, errbackArgs=(None,))
        return await d

    def get(self, key: str) -> Deferred[str | None]:
        return Deferred.fromCoroutine(self._get(key))

    async def _get_latest(self, key: str) -> str | None:
        if self._usable() and key not in self._tombstones:
            d = self._shared.get(key).addCallbacks(
                self._succeeded, self._failed, errbackArgs=(None,)
            )
            shared = await d
            if shared is not None:
                return shared
        return await self._local.get(key)

    def get_latest(self, key: str) -> Deferred[str | None]:
        """
        The shared cache's value first (what other instances wrote last),
        the local one when the shared cache has none or fails: for
        compare-before-write, where a local copy may be out of date.
        """
        return Deferred.fromCoroutine(self._get_latest(key))

    def _both(self, local: Deferred[None], shared: Any) -> Deferred[None]:
        if not self._usable():
            return local
        d: Deferred[None] = shared()
        return d.addCallbacks(self._succeeded, self._failed, errbackArgs=(None,))

    def set(self, key: str, token: str, ttl: float) -> Deferred[None]:
        self._tombstones.pop(key, None)
        return self._both(
            self._local.set(key, token, ttl), lambda: self._shared.set(key, token, ttl)
        )

    def delete(self, key: str) -> Deferred[None]:
        self._tombstones[key] = self._clock.seconds() + TOMBSTONE_SECONDS

        def deleted(result: None) -> None:
            if self._down_until is None:
                self._tombstones.pop(key, None)
            return result

        d = self._both(self._local.delete(key), lambda: self._shared.delete(key))
        return d.addCallback(deleted)

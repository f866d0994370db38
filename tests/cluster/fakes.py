"""
In-memory doubles for the cluster unit tests: a Redis that knows the
commands and the two lease scripts hammal sends, with expiry on a
L{task.Clock}, and switches for an outage or a Redis that never answers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from hammal.cluster.lease import RELEASE_SCRIPT, RENEW_SCRIPT


class FakeRedisDown(ConnectionError):
    """What the fake raises while L{FakeRedis.down} is set."""


class FakeRedis:
    """
    The subset of txredisapi the lease uses: C{set} (NX, PX), C{get},
    C{eval} of L{RENEW_SCRIPT} and L{RELEASE_SCRIPT}.

    @ivar down: every call fails at once (connection refused).
    @ivar hang: every call returns a Deferred that never fires.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float | None]] = {}
        self.down = False
        self.hang = False
        self.calls: list[tuple[Any, ...]] = []

    def _live(self, key: str) -> str | None:
        entry = self.data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and self.clock.seconds() >= expires:
            del self.data[key]
            return None
        return value

    def _answer(self, call: tuple[Any, ...], compute: Any) -> Deferred[Any]:
        self.calls.append(call)
        if self.hang:
            return Deferred()
        if self.down:
            return fail(FakeRedisDown("Not connected"))
        return succeed(compute())

    def ttl(self, key: str) -> float | None:
        """Seconds left on C{key} (None: no key or no expiry)."""
        if self._live(key) is None:
            return None
        expires = self.data[key][1]
        return None if expires is None else expires - self.clock.seconds()

    def set(
        self,
        key: str,
        value: str,
        expire: int | None = None,
        pexpire: int | None = None,
        only_if_not_exists: bool = False,
        only_if_exists: bool = False,
    ) -> Deferred[Any]:
        def compute() -> Any:
            if only_if_not_exists and self._live(key) is not None:
                return None
            expires = None
            if pexpire is not None:
                expires = self.clock.seconds() + pexpire / 1000
            self.data[key] = (value, expires)
            return "OK"

        return self._answer(("set", key, value, pexpire, only_if_not_exists), compute)

    def get(self, key: str) -> Deferred[Any]:
        return self._answer(("get", key), lambda: self._live(key))

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        key = keys[0]

        def compute() -> int:
            if self._live(key) != args[0]:
                return 0
            if script == RENEW_SCRIPT:
                self.data[key] = (args[0], self.clock.seconds() + int(args[1]) / 1000)
                return 1
            if script == RELEASE_SCRIPT:
                del self.data[key]
                return 1
            raise AssertionError(f"unexpected script {script!r}")

        return self._answer(("eval", script, key, tuple(args)), compute)

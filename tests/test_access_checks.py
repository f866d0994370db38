"""
Tests for L{hammal.access.checks} and L{hammal.access.throttle}: the cost
of password checks kept in bounds, failed logins per address answered
with C{429}, and what the gate logs of them.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Callable

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hammal.access import AccessRules, HtpasswdFile, SingleUser
from hammal.access.checks import CredentialChecker, PasswordHashingPool
from hammal.access.throttle import LoginThrottle
from hammal.errors import TooManyRequests
from hammal.web.gate import Gate
from tests.test_v2 import Mirror


class _NoSharedPool:
    """A reactor whose shared thread pool must not be used."""

    def getThreadPool(self) -> Any:
        raise AssertionError("password hashing ran on the reactor's shared thread pool")

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class _Pool:
    """A thread pool that runs work when told to, and counts it."""

    def __init__(self, run_at_once: bool = True) -> None:
        self.calls = 0
        self.run_at_once = run_at_once
        self.held: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self,
        on_result: Callable[[bool, Any], None],
        f: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.calls += 1

        def run() -> None:
            on_result(True, f(*args, **kwargs))

        if self.run_at_once:
            run()
        else:
            self.held.append(run)


def _htpasswd(test: SynchronousTestCase, password: str) -> str:
    path = test.mktemp()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    with open(path, "w") as f:
        f.write(f"alice:{hashed}\n")
    return path


class CredentialCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = _Pool()
        self.path = _htpasswd(self, "wonderland")
        self.users = HtpasswdFile(self.path, self.clock)
        self.checker = CredentialChecker(
            self.users,
            self.clock,
            _NoSharedPool(),
            self.pool,
            success_ttl=30,  # type: ignore[arg-type]
        )

    def check(self, user: str, password: str) -> bool:
        return bool(
            self.successResultOf(Deferred.fromCoroutine(self.checker.check(user, password)))
        )

    def test_own_pool(self) -> None:
        self.assertTrue(self.check("alice", "wonderland"))
        self.assertFalse(self.check("alice", "nope"))
        self.assertEqual(self.pool.calls, 2)

    def test_success_remembered_for_a_while(self) -> None:
        self.assertTrue(self.check("alice", "wonderland"))
        self.assertTrue(self.check("alice", "wonderland"))
        self.assertEqual(self.pool.calls, 1)
        self.clock.advance(31)
        self.assertTrue(self.check("alice", "wonderland"))
        self.assertEqual(self.pool.calls, 2)

    def test_failure_never_remembered(self) -> None:
        for _ in range(3):
            self.assertFalse(self.check("alice", "nope"))
        self.assertEqual(self.pool.calls, 3)

    def test_password_not_kept(self) -> None:
        self.check("alice", "wonderland")
        stored = b"".join(self.checker._succeeded)
        self.assertNotIn(b"wonderland", stored)
        other = CredentialChecker(self.users, self.clock, _NoSharedPool(), self.pool)  # type: ignore[arg-type]
        self.assertNotEqual(
            other._fingerprint("alice", "wonderland"),
            self.checker._fingerprint("alice", "wonderland"),
        )

    def test_changed_file_forgets(self) -> None:
        """A password changed in the htpasswd file stops working at once."""
        self.assertTrue(self.check("alice", "wonderland"))
        hashed = bcrypt.hashpw(b"new-one", bcrypt.gensalt(4)).decode()
        with open(self.path, "w") as f:
            f.write(f"alice:{hashed}\n# changed\n")
        os.utime(self.path, ns=(1, 1))
        self.clock.advance(2)  # the file is looked at once a second
        self.assertFalse(self.check("alice", "wonderland"))
        self.assertTrue(self.check("alice", "new-one"))

    def test_waiting_checks_bounded(self) -> None:
        pool = _Pool(run_at_once=False)
        checker = CredentialChecker(
            self.users,
            self.clock,
            _NoSharedPool(),
            pool,
            max_waiting=2,  # type: ignore[arg-type]
        )
        waiting = [Deferred.fromCoroutine(checker.check("alice", "wonderland")) for _ in range(2)]
        refused = Deferred.fromCoroutine(checker.check("alice", "wonderland"))
        failure = self.failureResultOf(refused, TooManyRequests)
        self.assertEqual(failure.value.headers["Retry-After"], "1")
        for run in pool.held:
            run()
        for d in waiting:
            self.assertTrue(self.successResultOf(d))
        # Room again (and the success is remembered).
        self.assertTrue(
            self.successResultOf(Deferred.fromCoroutine(checker.check("alice", "wonderland")))
        )

    def test_pool_service(self) -> None:
        service = PasswordHashingPool(threads=1)
        service.startService()
        self.assertTrue(service.pool.started)
        self.assertEqual(service.pool.max, 1)
        service.stopService()
        self.assertFalse(service.pool.started)


class LoginThrottleTests(SynchronousTestCase):
    def test_refused_after_the_limit(self) -> None:
        clock = Clock()
        throttle = LoginThrottle(clock, limit=3, window=60, penalty=30)
        for _ in range(2):
            throttle.failed("192.0.2.1")
        throttle.check("192.0.2.1")
        throttle.failed("192.0.2.1")
        with self.assertRaises(TooManyRequests) as caught:
            throttle.check("192.0.2.1")
        self.assertEqual(caught.exception.headers["Retry-After"], "30")
        throttle.check("192.0.2.2")
        clock.advance(30)
        throttle.check("192.0.2.1")

    def test_failures_outside_the_window_forgotten(self) -> None:
        clock = Clock()
        throttle = LoginThrottle(clock, limit=3, window=60, penalty=30)
        for _ in range(5):
            throttle.failed("192.0.2.1")
            clock.advance(31)
        throttle.check("192.0.2.1")


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class GateThrottleTests(SynchronousTestCase):
    """Through the resource: 429 after repeated failures from one address."""

    def setUp(self) -> None:
        self.clock = Clock()
        rules = AccessRules(trusted_proxies=["127.0.0.0/8"])
        gate = Gate("basic", self.clock, None, rules, SingleUser("alice", "wonderland"))
        self.mirror = Mirror(cache_dir=self.mktemp(), gate=gate)

    def get(self, authorization: bytes, client: str = "198.51.100.7") -> Any:
        headers = {b"authorization": [authorization], b"x-forwarded-for": [client.encode()]}
        return self.mirror.request(b"GET", "/v2/", headers)

    def test_429_then_served_again(self) -> None:
        for _ in range(10):
            self.assertEqual(self.get(_basic("alice", "guess")).code, 401)
        refused = self.get(_basic("alice", "wonderland"))
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.headers.getRawHeaders(b"retry-after"), [b"60"])
        # Another address is not affected.
        self.assertEqual(self.get(_basic("alice", "wonderland"), "198.51.100.8").code, 200)
        self.clock.advance(61)
        self.assertEqual(self.get(_basic("alice", "wonderland")).code, 200)

    def test_user_names_escaped_in_the_log(self) -> None:
        with capturedLogs() as events:
            self.get(_basic("mallory\n2026-01-01 [hammal#info] admin logged in\x1b[2J", "x"))
        lines = [
            formatEvent(event) for event in events if "refused credentials" in formatEvent(event)
        ]
        self.assertEqual(len(lines), 1)
        self.assertNotIn("\n", lines[0])
        self.assertNotIn("\x1b", lines[0])
        self.assertIn("mallory\\n2026", lines[0])

"""
Shared upstream work has a deadline: a blob fill that upstream does not
start answering, and a token request whose body stalls, give every waiter a
504 and are dropped, so the next request starts afresh.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.cache.blobs import BlobCache
from hammal.cache.store import BlobStore
from hammal.errors import UpstreamTimeout
from hammal.reference import Digest
from hammal.stream import ReadBounds
from hammal.ttlstore import MemoryTtlStore
from hammal.upstream.auth import UpstreamAuth
from hammal.upstream.challenge import Challenge
from hammal.upstream.client import upstream_error
from tests.test_stream import _BodyResponse

DIGEST = Digest.of(b"layer")


class BlobFillDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        store = BlobStore(self.mktemp())
        store.open()
        self.cache = BlobCache(store, self.clock, read_timeout=1.0, resumes=2, deadline=5.0)
        self.requests: list[Deferred[Any]] = []
        self.cancelled = 0

    def start(self, offset: int) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self._cancelled())
        self.requests.append(d)
        return d

    def _cancelled(self) -> None:
        self.cancelled += 1

    def test_fill_that_never_starts_fails_every_waiter(self) -> None:
        """
        Upstream never answers the fill's request: at the deadline the
        request is cancelled, every waiter gets a 504 and the fill is
        dropped; the next request starts a new one.
        """
        fetch, joined = self.cache.fetch(DIGEST, self.start, "up.test")
        self.assertFalse(joined)
        again, joined = self.cache.fetch(DIGEST, self.start, "up.test")
        self.assertTrue(joined)
        waiters = [fetch.when_started(), again.when_started()]
        self.clock.advance(4.9)
        for waiter in waiters:
            self.assertNoResult(waiter)
        self.clock.advance(0.1)
        for waiter in waiters:
            failure = self.failureResultOf(waiter, UpstreamTimeout)
            self.assertEqual(failure.value.status, 504)
            self.assertIn("did not answer", failure.getErrorMessage())
        self.assertEqual(self.cancelled, 1)
        self.assertIsNone(self.cache.in_flight(DIGEST))
        fresh, joined = self.cache.fetch(DIGEST, self.start, "up.test")
        self.assertFalse(joined)
        self.assertIsNot(fresh, fetch)
        self.assertEqual(len(self.requests), 2)

    def test_stalled_error_body_fails_the_fill(self) -> None:
        """A 503 whose body stalls ends the fill after the idle limit."""
        fetch, _ = self.cache.fetch(DIGEST, self.start, "up.test")
        waiter = fetch.when_started()
        response = _BodyResponse()
        response.code = 503  # type: ignore[attr-defined]
        response.headers = Headers()  # type: ignore[attr-defined]
        self.requests[0].callback(response)
        self.assertNoResult(waiter)
        self.clock.advance(1.0)
        failure = self.failureResultOf(waiter)
        self.assertIn("HTTP 503", failure.getErrorMessage())
        self.assertTrue(response.transport.stopped)
        self.assertIsNone(self.cache.in_flight(DIGEST))


class TokenDeadlineTests(SynchronousTestCase):
    """A token request is shared by every request for its scope: it must end."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[Deferred[Any]] = []
        self.auth = UpstreamAuth(
            "https://registry.test",
            MemoryTtlStore(self.clock),
            self.send,
            upstream_error,
            clock=self.clock,
            bounds=ReadBounds(self.clock, idle=1.0, deadline=5.0, upstream="auth.test"),
        )
        self.challenge = Challenge(
            "bearer", {"realm": "https://auth.test/token", "service": "registry.test"}
        )

    def send(self, method: bytes, url: str, headers: Headers) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.sent.append(d)
        return d

    def answer(self) -> Deferred[bytes | None]:
        return Deferred.fromCoroutine(self.auth.answer(self.challenge, "repository:a:pull", None))

    def test_stalled_token_body(self) -> None:
        """The body stops after a few bytes: every waiter fails after the idle limit."""
        waiters = [self.answer(), self.answer()]
        self.assertEqual(len(self.sent), 1)
        response = _BodyResponse()
        response.code = 200  # type: ignore[attr-defined]
        self.sent[0].callback(response)
        assert response.protocol is not None
        response.protocol.dataReceived(b'{"tok')
        self.clock.advance(1.0)
        for waiter in waiters:
            self.failureResultOf(waiter, UpstreamTimeout)
        self.assertTrue(response.transport.stopped)
        self.answer()
        self.assertEqual(len(self.sent), 2, "the next request asks for a token afresh")

    def test_token_realm_that_never_answers(self) -> None:
        """No answer at all: the shared token request is given up at the deadline."""
        waiter = self.answer()
        self.clock.advance(5.0)
        failure = self.failureResultOf(waiter, UpstreamTimeout)
        self.assertIn("did not finish within 5 seconds", failure.getErrorMessage())
        self.answer()
        self.assertEqual(len(self.sent), 2)

"""
Tests for L{hammal.app}: the composition root builds a working graph, and
what it configures stays with the app rather than changing Twisted globally.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from hammal.app import App, build_app
from hammal.cache.fetch import BlobFetch, run_here
from hammal.cache.threads import DedicatedThread
from hammal.config import Settings
from hammal.reference import Digest
from tests.fakes import REGISTRY, FakeUpstream, stub_for


def _app(**settings: object) -> App:
    stub = stub_for(FakeUpstream())
    settings.setdefault("cache_dir", None)
    return build_app(
        Settings(upstream=f"https://{REGISTRY}", **settings),  # type: ignore[arg-type]
        MemoryReactorClock(),
        http_client=stub,
        redirect_client=stub,
        offload=run_here,
    )


def _send(app: App, headers: int, padding: int = 0) -> bytes:
    """What the main site answers a request with C{headers} extra header lines."""
    channel = app.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    lines = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * padding) for i in range(headers))
    channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: mirror.test\r\n" + lines + b"\r\n")
    return transport.value()


class HeaderLimitTests(SynchronousTestCase):
    """--max-headers and --max-header-bytes live on the app's site."""

    def test_too_many_headers(self) -> None:
        """More header lines than --max-headers: 400, the connection closed."""
        app = _app(max_headers=5)
        self.assertTrue(_send(app, 10).startswith(b"HTTP/1.1 400 "))
        self.assertFalse(_send(app, 2).startswith(b"HTTP/1.1 400 "))

    def test_too_many_header_bytes(self) -> None:
        """Headers larger than --max-header-bytes in all: 400."""
        app = _app(max_header_bytes=2048)
        self.assertTrue(_send(app, 4, padding=1000).startswith(b"HTTP/1.1 400 "))
        self.assertFalse(_send(app, 1, padding=1000).startswith(b"HTTP/1.1 400 "))

    def test_twisted_unchanged(self) -> None:
        """Building an app leaves every other HTTPChannel with Twisted's limits."""
        before = (http.HTTPChannel.maxHeaders, http.HTTPChannel.totalHeadersSize)
        _app(max_headers=3, max_header_bytes=1024)
        self.assertEqual((http.HTTPChannel.maxHeaders, http.HTTPChannel.totalHeadersSize), before)


class GraphTests(SynchronousTestCase):
    """What L{build_app} wires, seen from outside."""

    def test_services(self) -> None:
        """
        Without a cache: password hashing, draining and the upstreams'
        warm-up run beside the listeners.
        """
        app = _app()
        self.assertEqual(len(app.services), 3)
        self.assertIsNone(app.blobs)
        self.assertIsNotNone(app.default)


class HoldTailTests(SynchronousTestCase):
    """--no-hold-tail reaches the blob cache's fills; off by default."""

    def test_default_holds_the_tail(self) -> None:
        app = _app(cache_dir=self.mktemp())
        assert app.blobs is not None
        self.assertTrue(app.blobs.hold_tail)

    def test_no_hold_tail(self) -> None:
        app = _app(cache_dir=self.mktemp(), no_hold_tail=True)
        assert app.blobs is not None
        self.assertFalse(app.blobs.hold_tail)

    def test_no_hold_tail_hashes_on_a_thread_of_its_own(self) -> None:
        """
        With --no-hold-tail and the default offload, fills hash on a
        dedicated thread of lower priority, started with the services;
        with the tail held, no such thread.
        """
        stub = stub_for(FakeUpstream())
        built = {}
        for hold in (True, False):
            built[hold] = build_app(
                Settings(
                    upstream=f"https://{REGISTRY}",
                    cache_dir=self.mktemp(),
                    no_hold_tail=not hold,
                ),
                MemoryReactorClock(),
                http_client=stub,
                redirect_client=stub,
            )
        threads = [s for s in built[False].services if isinstance(s, DedicatedThread)]
        self.assertEqual(len(threads), 1)
        assert built[False].blobs is not None
        self.assertIs(built[False].blobs._hash_offload, threads[0])
        self.assertFalse(any(isinstance(s, DedicatedThread) for s in built[True].services))


class UpstreamMinRateTests(SynchronousTestCase):
    """--upstream-min-rate reaches every fill of the blob cache, and every uncached relay."""

    def test_reaches_the_fills(self) -> None:
        for rate in (1024, 0, 65536):
            app = _app(cache_dir=self.mktemp(), upstream_min_rate=rate)
            assert app.blobs is not None
            self.assertEqual(app.blobs.min_rate, rate)
            digest = Digest.parse("sha256:" + "ab" * 32)
            fill, joined = app.blobs.fetch(digest, lambda offset: Deferred(), "upstream.test")
            self.assertFalse(joined)
            self.assertIsInstance(fill, BlobFetch)
            assert isinstance(fill, BlobFetch)
            self.assertEqual(fill._min_rate, rate)

    def test_reaches_the_uncached_relays(self) -> None:
        """
        ... and every blob relayed uncached (C{--no-cache}, the cache's
        bypass, a refused fill): the pull services hold it too.
        """
        for rate in (1024, 0, 65536):
            for cache_dir in (None, self.mktemp()):
                app = _app(cache_dir=cache_dir, upstream_min_rate=rate)
                assert app.default is not None
                self.assertEqual(app.default._min_rate, rate)

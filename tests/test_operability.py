"""
Tests for metrics, readiness, draining and connection limits, in memory.
"""

from __future__ import annotations

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hammal.drain import DrainService
from hammal.metrics import REGISTRY
from hammal.web.health import Readiness, cache_dir_writable
from hammal.web.limits import ConnectionLimit
from tests.fakes import MANIFEST_V2
from tests.test_v2 import Mirror

ACCEPT = {b"accept": [MANIFEST_V2.encode()]}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class MetricsTests(SynchronousTestCase):
    """Counters move by the right amounts after real requests."""

    def test_request_and_cache_counters(self) -> None:
        mirror = Mirror(cache_dir=self.mktemp())
        mirror.world.add_image("library/alpine", "3.20", b'{"a":1}')
        blob = b"z" * 5000
        digest = mirror.world.add_blob(blob)
        before = {
            "manifest_ok": sample("hammal_requests_total", route="manifest", status="200"),
            "blob_bytes": sample("hammal_response_bytes_total", route="blob"),
            "blob_hit": sample("hammal_cache_responses_total", kind="blob", outcome="hit"),
            "blob_miss": sample("hammal_cache_responses_total", kind="blob", outcome="miss"),
            "fetches": sample("hammal_blob_fetches_total"),
            "upstream_bytes": sample("hammal_upstream_bytes_total"),
            "tokens_miss": sample("hammal_token_cache_lookups_total", result="miss"),
        }
        for _ in range(3):
            mirror.body(mirror.request(b"GET", "/v2/alpine/manifests/3.20", ACCEPT))
        for _ in range(2):
            mirror.body(mirror.request(b"GET", f"/v2/alpine/blobs/{digest}"))
        self.assertEqual(
            sample("hammal_requests_total", route="manifest", status="200") - before["manifest_ok"],
            3,
        )
        self.assertEqual(
            sample("hammal_response_bytes_total", route="blob") - before["blob_bytes"], 10000
        )
        self.assertEqual(
            sample("hammal_cache_responses_total", kind="blob", outcome="miss")
            - before["blob_miss"],
            1,
        )
        self.assertEqual(
            sample("hammal_cache_responses_total", kind="blob", outcome="hit") - before["blob_hit"],
            1,
        )
        self.assertEqual(sample("hammal_blob_fetches_total") - before["fetches"], 1)
        self.assertEqual(sample("hammal_upstream_bytes_total") - before["upstream_bytes"], 5000)

    def test_metrics_endpoint(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/metrics")
        self.assertEqual(response.code, 200)
        text = mirror.body(response).decode()
        self.assertIn("hammal_requests_total", text)
        self.assertIn("hammal_open_connections", text)


class ReadinessTests(SynchronousTestCase):
    def test_ready_then_draining(self) -> None:
        mirror = Mirror()
        response = mirror.request(b"GET", "/readyz")
        self.assertEqual(response.code, 200)
        self.assertTrue(json.loads(mirror.body(response))["ready"])
        mirror.readiness.draining = True
        response = mirror.request(b"GET", "/readyz")
        self.assertEqual(response.code, 503)
        self.assertIn("draining", json.loads(mirror.body(response))["checks"]["draining"])

    def test_failing_check(self) -> None:
        mirror = Mirror()

        async def redis_down() -> str | None:
            return "redis not reachable"

        mirror.readiness.add("redis", redis_down)
        response = mirror.request(b"GET", "/readyz")
        self.assertEqual(response.code, 503)
        self.assertEqual(
            json.loads(mirror.body(response))["checks"]["redis"], "redis not reachable"
        )

    def test_cache_dir_check(self) -> None:
        good = self.mktemp()
        os.makedirs(good)
        self.assertIsNone(
            self.successResultOf(Deferred.fromCoroutine(_run(cache_dir_writable(good))))
        )
        missing = os.path.join(good, "missing")
        problem = self.successResultOf(Deferred.fromCoroutine(_run(cache_dir_writable(missing))))
        self.assertIn("not writable", problem)


async def _run(check: object) -> str | None:
    return await check()  # type: ignore[operator, no-any-return]


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.readiness = Readiness()
        self.in_flight = 2
        self.service = DrainService(self.readiness, lambda: self.in_flight, self.clock, timeout=30)
        self.service.startService()

    def test_waits_for_in_flight(self) -> None:
        """Stopping waits until in-flight requests finish; readiness fails at once."""
        d = self.service.stopService()
        self.assertTrue(self.readiness.draining)
        self.clock.advance(5)
        self.assertNoResult(d)
        self.in_flight = 0
        self.clock.advance(0.1)
        self.successResultOf(d)

    def test_gives_up_after_timeout(self) -> None:
        d = self.service.stopService()
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.successResultOf(d)


class ConnectionLimitTests(SynchronousTestCase):
    """
    The connection limit in front of the site. The site's channels arm
    their idle timeouts on a L{Clock}, never on the global reactor, where
    they would outlive the test and make a later real-reactor test dirty.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def site(self) -> Site:
        return Site(Resource(), reactor=self.clock)

    def test_refuses_beyond_limit(self) -> None:
        """Past --max-connections a client gets a 503 JSON answer and is closed."""
        factory = ConnectionLimit(self.site(), max_connections=2)
        address = IPv4Address("TCP", "127.0.0.1", 1234)
        transports = []
        for _ in range(3):
            protocol = factory.buildProtocol(address)
            transport = StringTransport()
            protocol.makeConnection(transport)
            transports.append(transport)
        self.assertEqual(transports[0].value(), b"")
        refused = transports[2].value()
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "))
        self.assertIn(b'"errors"', refused)
        self.assertTrue(transports[2].disconnecting)
        self.assertFalse(transports[0].disconnecting)

    def test_timeouts_on_the_given_clock(self) -> None:
        """
        The accepted connections' idle timeouts run on the site's clock:
        nothing is left on the global reactor, and they still fire.
        """
        from twisted.internet import reactor

        before = set(reactor.getDelayedCalls())  # type: ignore[attr-defined]
        factory = ConnectionLimit(self.site(), max_connections=2)
        transport = StringTransport()
        factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234)).makeConnection(transport)
        self.assertEqual(set(reactor.getDelayedCalls()), before)  # type: ignore[attr-defined]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(self.clock.getDelayedCalls()[0].getTime())
        self.assertTrue(transport.disconnecting)

    def test_tls_probe_on_plain_port_answered_at_once(self) -> None:
        """A TLS ClientHello on a plain port gets a 400 and a close, not a long wait."""
        factory = ConnectionLimit(self.site(), max_connections=None)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)


class AccessLogTests(SynchronousTestCase):
    """One structured access-log event per request, with a request id."""

    def test_event_fields_and_request_id(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, object]] = []

        def observe(event: dict[str, object]) -> None:
            if event.get("log_namespace") == "hammal.access":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        mirror = Mirror()
        mirror.world.add_image("library/alpine", "3.20", b"{}")
        given = mirror.request(b"GET", "/v2/alpine/manifests/3.20", {b"x-request-id": [b"abc-123"]})
        self.assertEqual(given.headers.getRawHeaders(b"x-request-id"), [b"abc-123"])
        generated = mirror.request(b"GET", "/v2/", {b"x-request-id": [b"bad id\\x00"]})
        (request_id,) = generated.headers.getRawHeaders(b"x-request-id")
        self.assertRegex(request_id.decode(), r"^[0-9a-f]{16}$")
        manifest_events = [e for e in events if e["route"] == "manifest"]
        self.assertEqual(len(manifest_events), 1)
        event = manifest_events[0]
        self.assertEqual(event["request_id"], "abc-123")
        self.assertEqual(event["status"], 200)
        self.assertEqual(event["method"], "GET")
        self.assertEqual(event["upstream"], "registry.test")
        self.assertGreaterEqual(event["attempts"], 1)


class RequestBodyTests(SynchronousTestCase):
    """Large request bodies are refused at once, never spooled to disk."""

    def test_declared_large_body_refused(self) -> None:
        from twisted.internet.testing import StringTransport

        from hammal.web.site import HammalSite

        site = HammalSite(Resource(), Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"PUT /v2/a/blobs/uploads/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10000000000\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

    def test_streamed_large_body_refused(self) -> None:
        from twisted.internet.testing import StringTransport

        from hammal.web.site import HammalSite

        site = HammalSite(Resource(), Clock())
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /v2/auth HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 60000
        for _ in range(3):
            channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(transport.disconnecting)

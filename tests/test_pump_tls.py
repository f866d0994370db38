"""
Tests for L{hammal.cache.tlspump}: a fill's upstream body over TLS read on
a pump thread, over real TCP (a twisted.web upstream behind TLS on
127.0.0.1 with a self-signed certificate, Twisted's HTTP client trusting
it, the real reactor and threads).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import File

from hammal import metrics
from hammal.cache.fetch import BlobFetch, DigestMismatch, _FileWriter, run_here
from hammal.cache.pump import BodyPumps
from hammal.cache.store import BlobStore
from hammal.cache.tlsbody import TLSBody
from hammal.cache.writes import LocalCacheError
from hammal.errors import UpstreamTimeout
from hammal.reference import Digest
from hammal.selfsigned import ensure_self_signed
from hammal.upstream.forward_proxy import _TunnelEndpointFactory
from hammal.upstream.proxy_rules import parse_proxy_url
from tests.test_pump import _BreaksOnce, _digest, _Stalls, _turn

MiB = 1024 * 1024


class _ClosesTLSOnce(_BreaksOnce):
    """
    Like L{_BreaksOnce}, but ends the first answer with a clean TLS close
    (C{close_notify}) instead of a reset.
    """

    def render_GET(self, request: Any) -> Any:
        if self.requests == 0 and request.getHeader(b"range") is None:
            self.requests += 1
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", b"%d" % len(self.blob))
            request.write(self.blob[: len(self.blob) // 2])
            reactor.callLater(0.05, self._close, request.channel.transport)
            return NOT_DONE_YET
        return super().render_GET(request)

    def _close(self, transport: Any) -> None:
        # The channel is the TLS layer's producer: while registered, TLS
        # waits for it before it sends close_notify.
        transport.unregisterProducer()
        transport.loseConnection()


def _pumped(kind: str) -> float:
    """hammal_pumped_bodies_total{kind} so far."""
    value = metrics.REGISTRY.get_sample_value("hammal_pumped_bodies_total", {"kind": kind})
    return value or 0.0


def tls_upstream(test: TestCase, web: Resource) -> tuple[bytes, Agent, BrowserLikePolicyForHTTPS]:
    """A TLS listener on 127.0.0.1 serving C{web}, an Agent that trusts it, and its policy."""
    made = ensure_self_signed(test.mktemp(), ["localhost"], ["127.0.0.1"])
    with open(made.cert_path, "rb") as cert_file, open(made.key_path, "rb") as key_file:
        cert_pem, key_pem = cert_file.read(), key_file.read()
    server = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    port = reactor.listenSSL(0, Site(web), server, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    pool = HTTPConnectionPool(reactor, persistent=False)
    policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(cert_pem))
    agent = Agent(reactor, contextFactory=policy, pool=pool)
    return b"https://127.0.0.1:%d/" % port.getHost().port, agent, policy


class TLSPumpedFillTests(TestCase):
    """A fill of a blob of known length over TLS, decrypted on a pump thread."""

    def setUp(self) -> None:
        self.store = BlobStore(self.mktemp())
        self.store.open()
        files = self.mktemp()
        os.makedirs(files)
        self.files = files
        self.web = Resource()
        self.web.putChild(b"files", File(files, defaultType="application/octet-stream"))
        self.base, self.agent, self.policy = tls_upstream(self, self.web)
        self.pumps = BodyPumps(reactor, threads=2)
        self.pumps.startService()
        self.addCleanup(self.pumps.stopService)

    def blob_file(self, name: str, data: bytes) -> bytes:
        with open(os.path.join(self.files, name), "wb") as out:
            out.write(data)
        return self.base + b"files/" + name.encode()

    def fetch(
        self,
        url: bytes,
        digest: Digest,
        hold_tail: bool = True,
        resumes: int = 0,
        read_timeout: float = 30,
        pumps: BodyPumps | None = None,
    ) -> BlobFetch:
        def start(offset: int) -> Deferred[Any]:
            headers = Headers()
            if offset:
                headers.addRawHeader(b"range", b"bytes=%d-" % offset)
            return self.agent.request(b"GET", url, headers)

        return BlobFetch(
            digest,
            self.store,
            reactor,
            start,
            read_timeout=read_timeout,
            resumes=resumes,
            upstream="upstream.test",
            offload=run_here,
            hold_tail=hold_tail,
            hash_offload=run_here,
            pumps=self.pumps if pumps is None else pumps,
        )

    def resumptions(self) -> list[str]:
        """The reasons the fills give for resuming, from now on."""
        reasons: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_format", "").startswith("resuming "):
                reasons.append(event["reason"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return reasons

    def assertStored(self, digest: Digest, blob: bytes) -> None:
        with open(self.store.path(digest), "rb") as stored:
            self.assertEqual(stored.read(), blob)

    @inlineCallbacks
    def test_blob_pumped_verified_and_stored(self) -> Any:
        """
        A 5 MiB blob over TLS is decrypted on a pump thread (not the event
        loop), hashed on the way and committed under its digest, byte for
        byte.
        """
        blob = os.urandom(5 * MiB + 123)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("good", blob), digest)
        counted = _pumped("tls")
        yield Deferred.fromCoroutine(fetch.run())
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 1})
        self.assertEqual(_pumped("tls"), counted + 1)
        self.assertStored(digest, blob)

    @inlineCallbacks
    def test_without_held_tail_the_hasher_follows_the_pumped_file(self) -> Any:
        """With C{--no-hold-tail} the TLS pump only writes; the digest still decides the commit."""
        blob = os.urandom(3 * MiB + 5)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("loose", blob), digest, hold_tail=False)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 1})
        self.assertStored(digest, blob)

    @inlineCallbacks
    def test_corrupt_bytes_never_stored(self) -> Any:
        """Bytes that do not hash to the digest fail the fill, and nothing is stored."""
        blob = os.urandom(4 * MiB)
        digest = _digest(blob)
        corrupt = bytearray(blob)
        corrupt[3 * MiB] ^= 0xFF
        fetch = self.fetch(self.blob_file("corrupt", bytes(corrupt)), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertIsInstance(fetch.failure, DigestMismatch)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 1})
        self.assertFalse(fetch.complete)
        self.assertLess(fetch.readable, len(blob))
        self.assertFalse(os.path.exists(self.store.path(digest)))
        self.assertFalse(os.path.exists(fetch.path))

    @inlineCallbacks
    def test_reset_mid_body_resumes_with_range(self) -> Any:
        """
        Upstream dropping the connection mid-body ends the TLS pump with
        the bytes it decrypted and wrote; the fill asks for the rest with
        C{Range} (pumped again) and the blob is whole and verified.
        """
        blob = os.urandom(6 * MiB)
        digest = _digest(blob)
        breaks = _BreaksOnce(blob)
        self.web.putChild(b"breaks", breaks)
        fetch = self.fetch(self.base + b"breaks", digest, resumes=2)
        resumed = self.resumptions()
        yield Deferred.fromCoroutine(fetch.run())
        self.assertEqual(len(resumed), 1)
        self.assertIn("the connection after", resumed[0])
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.complete)
        self.assertEqual(breaks.requests, 2)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 2})
        self.assertStored(digest, blob)

    @inlineCallbacks
    def test_tls_close_mid_body_resumes_with_range(self) -> Any:
        """A clean TLS close (C{close_notify}) before the announced end is a broken transfer too."""
        blob = os.urandom(6 * MiB)
        digest = _digest(blob)
        closes = _ClosesTLSOnce(blob)
        self.web.putChild(b"closes", closes)
        fetch = self.fetch(self.base + b"closes", digest, resumes=2)
        resumed = self.resumptions()
        yield Deferred.fromCoroutine(fetch.run())
        self.assertEqual(len(resumed), 1)
        self.assertIn("closed TLS after", resumed[0])
        self.assertIsNone(fetch.failure)
        self.assertTrue(fetch.complete)
        self.assertEqual(closes.requests, 2)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 2})
        self.assertStored(digest, blob)

    @inlineCallbacks
    def test_silent_upstream_times_out(self) -> Any:
        """A pumped TLS body that stops arriving fails the fill after the read timeout."""
        blob = os.urandom(4 * MiB)
        stalls = _Stalls(blob, sent=2 * MiB)
        self.web.putChild(b"stalls", stalls)
        fetch = self.fetch(self.base + b"stalls", _digest(blob), read_timeout=0.5)
        yield Deferred.fromCoroutine(fetch.run())
        for request in stalls.open:
            request.channel.transport.abortConnection()
        self.assertIsInstance(fetch.failure, UpstreamTimeout)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 1})
        self.assertFalse(os.path.exists(fetch.path))

    @inlineCallbacks
    def test_stopping_ends_a_pump(self) -> Any:
        """Stopping the pumps (hammal shutting down) ends a TLS pump on a silent upstream."""
        blob = os.urandom(4 * MiB)
        stalls = _Stalls(blob, sent=2 * MiB)
        self.web.putChild(b"stalls", stalls)
        fetch = self.fetch(self.base + b"stalls", _digest(blob))
        running = Deferred.fromCoroutine(fetch.run())
        while fetch.received < 2 * MiB:  # the pump has the socket
            yield _turn()
        yield self.pumps.stopService()
        yield running
        for request in stalls.open:
            request.channel.transport.abortConnection()
        self.assertIsInstance(fetch.failure, LocalCacheError)
        self.assertEqual(self.pumps.started_by_kind, {"tls": 1})

    @inlineCallbacks
    def test_event_loop_reads_when_no_pump_is_free(self) -> Any:
        """With every pump thread busy the fill decrypts on the event loop, as before."""
        busy = BodyPumps(reactor, threads=0)
        busy.startService()
        self.addCleanup(busy.stopService)
        blob = os.urandom(3 * MiB)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("nopump", blob), digest, pumps=busy)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(busy.started, 0)
        self.assertStored(digest, blob)

    @inlineCallbacks
    def test_event_loop_reads_what_cannot_be_handed_over(self) -> Any:
        """
        A TLS connection whose state the pump could not take over exactly
        (here: said so by the adapter) is read on the event loop instead.
        """
        self.patch(TLSBody, "problem", lambda self: "Twisted has bytes to send over TLS")
        blob = os.urandom(3 * MiB)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("kept", blob), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started, 0)
        self.assertStored(digest, blob)

    @inlineCallbacks
    def test_small_bodies_stay_on_the_event_loop(self) -> Any:
        """A TLS body under a MiB is not worth a thread: no pump starts."""
        blob = os.urandom(200 * 1024)
        digest = _digest(blob)
        fetch = self.fetch(self.blob_file("small", blob), digest)
        yield Deferred.fromCoroutine(fetch.run())
        self.assertTrue(fetch.complete)
        self.assertEqual(self.pumps.started, 0)


class _ProxiedTarget(Protocol):
    """The proxy's connection to the target of a C{CONNECT}."""

    def __init__(self, client: _ConnectProxy) -> None:
        self.client = client

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.transport.loseConnection()


class _ConnectProxy(Protocol):
    """
    A forward proxy that knows C{CONNECT} only: it connects to the target
    named, answers C{200} and relays bytes both ways (as tinyproxy does).
    """

    def __init__(self, relaying: set[_ConnectProxy]) -> None:
        self.head = b""
        self.target: _ProxiedTarget | None = None
        self.relaying = relaying

    def connectionMade(self) -> None:
        self.relaying.add(self)

    def dataReceived(self, data: bytes) -> None:
        if self.target is not None:
            self.target.transport.write(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        request, _, rest = self.head.partition(b"\r\n\r\n")
        host, port = request.split(b" ")[1].rsplit(b":", 1)
        self.head = b""
        target = _ProxiedTarget(self)
        self.transport.pauseProducing()
        connecting = ClientCreator(reactor, lambda: target).connectTCP(host.decode(), int(port))

        def connected(protocol: _ProxiedTarget) -> None:
            self.target = protocol
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                protocol.transport.write(rest)
            self.transport.resumeProducing()

        connecting.addCallbacks(connected, lambda failure: self.transport.loseConnection())

    def connectionLost(self, reason: Any = None) -> None:
        self.relaying.discard(self)
        if self.target is not None:
            self.target.transport.loseConnection()


class TunnelledTLSPumpTests(TLSPumpedFillTests):
    """
    The same fills through an outbound proxy's C{CONNECT} tunnel (TLS to
    the upstream inside it, as hammal's C{--upstream-proxy} makes them):
    past the open tunnel the bytes are the upstream's, and the pump reads
    them alike.
    """

    def setUp(self) -> None:
        super().setUp()
        relaying: set[_ConnectProxy] = set()
        proxy_port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _ConnectProxy(relaying)), interface="127.0.0.1"
        )
        self.addCleanup(proxy_port.stopListening)
        self.addCleanup(self.closed, relaying)
        proxy = parse_proxy_url(f"http://127.0.0.1:{proxy_port.getHost().port}", "test")
        endpoints = _TunnelEndpointFactory(reactor, proxy, self.policy, 10)
        self.agent = Agent.usingEndpointFactory(
            reactor, endpoints, HTTPConnectionPool(reactor, persistent=False)
        )

    @inlineCallbacks
    def closed(self, relaying: set[_ConnectProxy]) -> Any:
        """Until the tunnels closed (TLS closes over two more hops here), within 2 s."""
        for _ in range(200):
            if not relaying:
                break
            yield _turn()
        yield _turn()


class _Transport:
    """A body's transport that counts what the writer asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class HandedOverWriterTests(SynchronousTestCase):
    def test_resume_does_not_read_a_pumped_socket(self) -> None:
        """
        Once the body is handed over to a pump, resuming the writer (the
        file writer caught up) never has the event loop read the socket
        the pump reads; once taken back, it does again.
        """
        clock = Clock()
        writer = _FileWriter(None, 0, clock, 30, "upstream.test")  # type: ignore[arg-type]
        transport = _Transport()
        writer.makeConnection(transport)  # type: ignore[arg-type]
        writer.pause()
        writer.hand_over()
        writer.resume()
        self.assertEqual(transport.calls, ["pause"])
        writer.take_back()
        writer.resume()
        self.assertEqual(transport.calls, ["pause", "resume"])
        self.assertEqual(clock.getDelayedCalls()[0].getTime(), 30)

"""
Tests for L{hammal.upstream.addresses}: redirects are followed only to
public addresses, judged on the connection actually made, unless the
upstream is itself internal. The last test runs hammal's stack over real
TCP on 127.0.0.1, with an address policy that sees the upstream's port as a
public address (loopback-only machines have no other).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from hammal.cache.blobs import BlobCache
from hammal.cache.manifests import DiskTagStore, ManifestCache, ManifestStore
from hammal.cache.store import BlobStore
from hammal.errors import UpstreamBadResponse
from hammal.pull.service import PullService
from hammal.pull.upstreams import UpstreamSelector
from hammal.reference import Digest
from hammal.ttlstore import MemoryTtlStore
from hammal.upstream.addresses import (
    UPSTREAM_READ_SIZE,
    AddressPolicy,
    CheckedEndpointFactory,
    InternalAddressRefused,
    PeerZones,
    _CheckedEndpoint,
    is_internal_address,
)
from hammal.upstream.client import Upstream, UpstreamClient, make_http_client
from hammal.upstream.retry import RetryPolicy
from hammal.web.health import Readiness, ReadyResource
from hammal.web.root import build_root
from hammal.web.site import HammalSite
from hammal.web.v2 import V2Resource

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


class InternalAddressTests(SynchronousTestCase):
    def test_internal(self) -> None:
        for address in (
            "127.0.0.1",
            "127.9.9.9",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "fe80::1%eth0",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "224.0.0.1",
            "not an address",
        ):
            self.assertTrue(is_internal_address(address), address)

    def test_public(self) -> None:
        for address in ("8.8.8.8", "104.16.0.1", "2606:4700::1", "::ffff:8.8.8.8"):
            self.assertFalse(is_internal_address(address), address)


class _FakeEndpoint:
    """Connects at once to a protocol on a transport with the given peer."""

    def __init__(self, peer: str) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 80))

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        return defer.succeed(protocol)


class CheckedEndpointTests(SynchronousTestCase):
    origin = ("http", "cdn.example.com", 80)

    def connect(self, peer: str, refuse: bool, zones: PeerZones) -> tuple[_FakeEndpoint, Any]:
        fake = _FakeEndpoint(peer)
        endpoint = _CheckedEndpoint(fake, self.origin, AddressPolicy(), refuse, zones)  # type: ignore[arg-type]
        return fake, endpoint.connect(Factory.forProtocol(Protocol))

    def test_internal_peer_refused_before_anything_is_sent(self) -> None:
        """A name that resolved to 169.254.169.254: aborted, nothing written."""
        zones = PeerZones()
        fake, d = self.connect("169.254.169.254", True, zones)
        failure = self.failureResultOf(d, InternalAddressRefused)
        self.assertIn("169.254.169.254", str(failure.value))
        self.assertTrue(fake.transport.disconnected)
        self.assertEqual(fake.transport.value(), b"")
        self.assertTrue(zones.internal(self.origin))

    def test_public_peer_allowed(self) -> None:
        zones = PeerZones()
        fake, d = self.connect("8.8.8.8", True, zones)
        self.assertIsInstance(self.successResultOf(d), Protocol)
        self.assertFalse(fake.transport.disconnected)
        self.assertIs(zones.internal(self.origin), False)

    def test_recording_only(self) -> None:
        """Without refusal (upstream requests), the zone is only recorded."""
        zones = PeerZones()
        _, d = self.connect("10.0.0.5", False, zones)
        self.successResultOf(d)
        self.assertTrue(zones.internal(self.origin))
        self.assertIsNone(zones.internal(("http", "other", 80)))

    def test_zones_bounded(self) -> None:
        zones = PeerZones(max_entries=2)
        for port in range(3):
            zones.record(("http", "h", port), True)
        self.assertIsNone(zones.internal(("http", "h", 0)))
        self.assertTrue(zones.internal(("http", "h", 2)))


class _SeesPortAsPublic(AddressPolicy):
    """127.0.0.1 on one port looks like a public address; everything else is judged as usual."""

    def __init__(self, public_port: int) -> None:
        self.public_port = public_port

    def internal(self, host: str, port: int) -> bool:
        if port == self.public_port:
            return False
        return super().internal(host, port)


SECRET = b"iam-role-credentials: AKIA-not-for-clients\n"
SECRET_DIGEST = "sha256:" + hashlib.sha256(SECRET).hexdigest()
SECRET_MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": MANIFEST_V2, "config": {}, "layers": []}
).encode()


class _Metadata(Resource):
    """A loopback-only service (like a cloud metadata endpoint); counts its visitors."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []

    def render_GET(self, request: Request) -> bytes:
        self.paths.append(request.path.decode())
        if request.path.endswith(b"/manifest"):
            request.setHeader(b"content-type", MANIFEST_V2.encode())
            return SECRET_MANIFEST
        request.setHeader(b"content-type", b"application/octet-stream")
        return SECRET


class _RedirectingUpstream(Resource):
    """A registry that redirects every blob and manifest to C{location}."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.location = ""
        self.realm: str | None = None

    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        if path == "/v2/":
            return b"{}"
        if self.realm is not None:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", f'Bearer realm="{self.realm}"'.encode())
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"log in"}]}'
        request.setResponseCode(307)
        target = (
            "/manifest" if "/manifests/" in path else f"/latest/meta-data/{path.rsplit('/', 1)[1]}"
        )
        request.setHeader(b"location", (self.location + target).encode())
        return b""


class RedirectToInternalAddressTests(TestCase):
    """hammal over real TCP: a public upstream's redirect to loopback is refused."""

    def listen(self, site: Site) -> int:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def setUp(self) -> None:
        self.metadata = _Metadata()
        self.metadata_port = self.listen(Site(self.metadata))
        self.upstream = _RedirectingUpstream()
        self.upstream_port = self.listen(Site(self.upstream))

    def start_hammal(self, policy: AddressPolicy) -> tuple[str, BlobStore]:
        cache_dir = self.mktemp()
        os.makedirs(cache_dir)
        zones = PeerZones()
        clients = []
        for refuse in (False, True):
            pool = HTTPConnectionPool(reactor, persistent=True)
            self.addCleanup(pool.closeCachedConnections)
            clients.append(
                make_http_client(
                    reactor,
                    5,
                    zones=None if refuse else zones,
                    refuse_internal=refuse,
                    address_policy=policy,
                    pool=pool,
                )
            )
        url = f"http://127.0.0.1:{self.upstream_port}"
        client = self.client = UpstreamClient(
            Upstream(url, library_prefix=True),
            clients[0],
            reactor,
            MemoryTtlStore(reactor),
            RetryPolicy(retries=0),
            read_timeout=5,
            redirect_http=clients[1],
            zones=zones,
        )
        store = BlobStore(cache_dir)
        store.open()
        blobs = BlobCache(store, reactor, read_timeout=5, resumes=0, chunk_size=65536)
        manifest_store = ManifestStore(cache_dir)
        manifest_store.open()
        tags = DiskTagStore(cache_dir, reactor)
        tags.open()

        def manifests(upstream: str, remote: Any) -> ManifestCache:
            return ManifestCache(
                manifest_store,
                tags,
                reactor,
                upstream,
                remote,
                ttl=300,
                stale_if_error=3600,
                negative_ttl=30,
            )

        proxy = PullService(client, True, "follow", reactor, blobs, manifests)
        selector = UpstreamSelector(proxy, {}, [(url, proxy)])
        root = build_root(V2Resource(selector, None), ReadyResource(Readiness()), None)
        port = self.listen(HammalSite(root, reactor, timeout=5))
        return f"http://127.0.0.1:{port}", store

    async def get(self, url: str) -> tuple[int, bytes]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(url, pool=pool, headers={"accept": MANIFEST_V2}, timeout=10)
        return response.code, await response.content()

    @defer.inlineCallbacks
    def test_public_upstream_redirect_to_loopback_refused(self) -> Any:
        """
        The upstream looks public; its 307 to a loopback service (by
        address, and by a name that resolves there) is refused with a 502
        before the service sees a request, and nothing is cached.
        """
        hammal, store = self.start_hammal(_SeesPortAsPublic(self.upstream_port))
        for host in ("127.0.0.1", "localhost"):
            self.upstream.location = f"http://{host}:{self.metadata_port}"
            code, body = yield defer.ensureDeferred(
                self.get(f"{hammal}/v2/library/app/blobs/{SECRET_DIGEST}")
            )
            self.assertEqual(code, 502, body)
            self.assertEqual(json.loads(body)["errors"][0]["code"], "UNAVAILABLE")
            self.assertIn(b"internal address", body)
            self.assertNotIn(SECRET, body)
            code, body = yield defer.ensureDeferred(
                self.get(f"{hammal}/v2/library/app/manifests/latest")
            )
            self.assertEqual(code, 502, body)
        self.assertEqual(self.metadata.paths, [])
        self.assertEqual(len(store), 0)
        self.assertNotIn(Digest.parse(SECRET_DIGEST), store)

    @defer.inlineCallbacks
    def test_internal_upstream_redirect_to_loopback_followed(self) -> Any:
        """An upstream on loopback itself is in the same trust zone: followed."""
        hammal, store = self.start_hammal(AddressPolicy())
        self.upstream.location = f"http://127.0.0.1:{self.metadata_port}"
        code, body = yield defer.ensureDeferred(
            self.get(f"{hammal}/v2/library/app/blobs/{SECRET_DIGEST}")
        )
        self.assertEqual(code, 200, body)
        self.assertEqual(body, SECRET)
        self.assertEqual(self.metadata.paths, [f"/latest/meta-data/{SECRET_DIGEST}"])

    @defer.inlineCallbacks
    def test_public_upstream_realm_on_loopback_refused(self) -> Any:
        """
        A token realm is treated like a redirect: a public upstream's loopback
        realm is not asked.
        """
        hammal, _ = self.start_hammal(_SeesPortAsPublic(self.upstream_port))
        self.upstream.realm = f"http://127.0.0.1:{self.metadata_port}/token"
        code, body = yield defer.ensureDeferred(
            self.get(f"{hammal}/v2/library/app/manifests/latest")
        )
        self.assertEqual(code, 502, body)
        self.assertIn(b"internal address", body)
        self.assertEqual(self.metadata.paths, [])

    @defer.inlineCallbacks
    def test_internal_upstream_realm_on_loopback_asked(self) -> Any:
        """The control: a loopback upstream's loopback realm is asked."""
        hammal, _ = self.start_hammal(AddressPolicy())
        self.upstream.realm = f"http://127.0.0.1:{self.metadata_port}/token"
        code, body = yield defer.ensureDeferred(
            self.get(f"{hammal}/v2/library/app/manifests/latest")
        )
        self.assertEqual(self.metadata.paths, ["/token"])
        self.assertIn(b"sent no token", body, code)

    @defer.inlineCallbacks
    def test_direct_requests_to_a_loopback_realm_refused(self) -> Any:
        """
        send_direct (passthrough logins go to upstream's realm with the
        client's credentials): the public upstream itself is reached, a
        loopback realm is not.
        """
        self.start_hammal(_SeesPortAsPublic(self.upstream_port))
        upstream = f"http://127.0.0.1:{self.upstream_port}/v2/"
        response = yield defer.ensureDeferred(self.client.send_direct(b"GET", upstream, Headers()))
        self.assertEqual(response.code, 200)
        yield treq.content(response)
        realm = f"http://127.0.0.1:{self.metadata_port}/token"
        d = defer.ensureDeferred(self.client.send_direct(b"GET", realm, Headers()))
        failure = yield self.assertFailure(d, UpstreamBadResponse)
        self.assertIn("internal address", failure.message)
        self.assertEqual(self.metadata.paths, [])


@implementer(IHostnameResolver)
class _RecordingResolver:
    """A name resolver that only records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        return receiver


@implementer(IReactorPluggableNameResolver)
class _ResolvingMemoryReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.nameResolver = _RecordingResolver()

    def installNameResolver(self, resolver: Any) -> Any:
        old, self.nameResolver = self.nameResolver, resolver
        return old


class IPLiteralEndpointTests(SynchronousTestCase):
    """
    An upstream (or redirect) URL naming an IP address connects to it
    directly: no name resolution, which would cost a thread-pool round trip
    per new connection; names are still resolved.
    """

    def connect(self, url: bytes) -> _ResolvingMemoryReactor:
        reactor = _ResolvingMemoryReactor()
        factory = CheckedEndpointFactory(reactor, connect_timeout=7)
        factory.endpointForURI(URI.fromBytes(url)).connect(Factory.forProtocol(Protocol))
        return reactor

    def test_ipv4_literal(self) -> None:
        reactor = self.connect(b"http://127.0.0.1:5000/v2/")
        self.assertEqual(reactor.nameResolver.asked, [])
        host, port, _, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 5000, 7))

    def test_ipv6_literal(self) -> None:
        reactor = self.connect(b"https://[::1]:5443/v2/")
        self.assertEqual(reactor.nameResolver.asked, [])
        self.assertEqual(reactor.tcpClients[0][:2], ("::1", 5443))

    def test_name_resolved(self) -> None:
        reactor = self.connect(b"http://registry.test:5000/v2/")
        self.assertEqual(reactor.nameResolver.asked, ["registry.test"])
        self.assertEqual(reactor.tcpClients, [])


class UpstreamReadSizeTests(TestCase):
    """A real upstream connection (127.0.0.1, port 0) reads 1 MiB at once."""

    def test_upstream_reads_wide(self) -> Any:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/".encode()
        endpoint = CheckedEndpointFactory(reactor).endpointForURI(URI.fromBytes(url))
        d = endpoint.connect(Factory.forProtocol(Protocol))

        def connected(protocol: Any) -> None:
            self.addCleanup(protocol.transport.abortConnection)
            self.assertEqual(protocol.transport.bufferSize, UPSTREAM_READ_SIZE)
            self.assertEqual(protocol.transport.getPeer().port, port.getHost().port)

        return d.addCallback(connected)

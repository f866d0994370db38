"""
Tests for L{hammal.cluster.fill}: the blob cache's fills in a cluster, in
memory (real L{BlobCache}s on temporary directories, the lease on
L{FakeRedis}, the object store on L{FakeS3}, peers and upstream over
L{StubTreq}, time on a L{Clock}).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from hammal import metrics
from hammal.cache.blobs import BlobCache
from hammal.cache.fetch import BlobFetch
from hammal.cache.sources import ReadThrough
from hammal.cache.storage import BlobStorage
from hammal.cache.store import BlobStore
from hammal.cluster.fill import ClusterFills, peer_lookup
from hammal.cluster.lease import KEY_PREFIX, FillLeases
from hammal.cluster.peer import PeerBlobResource, PeerClient, mount_peer_endpoint
from hammal.cluster.peerauth import PeerAuth, generate_key
from hammal.reference import Digest
from hammal.storage.blobs import S3BlobStorage
from hammal.storage.health import StoreHealth
from hammal.storage.objects import object_key
from hammal.storage.s3 import MIN_PART_SIZE, S3Credentials, S3Location, S3Store
from tests.cluster.fakes import FakeRedis, FakeS3

BLOB = hashlib.sha256(b"layer").digest() * (MIN_PART_SIZE // 32 + 1000)  # > one part
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())
KEY = generate_key()
S3_ENDPOINT = "http://s3.test"


class Upstream(Resource):
    """A registry's blob endpoint: serves C{data} whole or from a C{Range} start."""

    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data
        self.gets: list[bytes | None] = []
        #: Send only the first half and wait for L{release}.
        self.hold = False
        self.held: list[tuple[Request, bytes]] = []

    def render_GET(self, request: Request) -> Any:
        wanted = request.getHeader(b"range")
        self.gets.append(wanted)
        request.setHeader(b"content-type", b"application/octet-stream")
        body = self.data
        if wanted:
            start = int(wanted.split(b"=")[1].rstrip(b"-"))
            request.setResponseCode(206)
            request.setHeader(
                b"content-range", b"bytes %d-%d/%d" % (start, len(self.data) - 1, len(self.data))
            )
            body = self.data[start:]
        if not self.hold:
            return body
        request.setHeader(b"content-length", b"%d" % len(body))
        half = len(body) // 2
        request.write(body[:half])
        self.held.append((request, body[half:]))
        return NOT_DONE_YET

    def release(self, corrupt: bool = False) -> None:
        """Send the rest of every held response (zeroed: a bad transfer)."""
        held, self.held = self.held, []
        for request, rest in held:
            request.write(bytes(len(rest)) if corrupt else rest)
            request.finish()


class Refusing(Resource):
    """A peer that is gone: every request gets a 502 (as from a proxy)."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(502)
        return b"{}"


class Node:
    """One instance: its blob cache and cluster parts, all in memory."""

    def __init__(
        self,
        test: "ClusterFillTests",
        name: str,
        peer: Resource | None = None,
        s3: StubTreq | None = None,
        key: bytes = KEY,
        leases: bool = True,
    ) -> None:
        self.url = f"http://{name}.test:5000"
        root = test.mktemp()
        store = BlobStore(root)
        store.open()
        storage: BlobStorage = store
        if s3 is not None:
            objects = S3Store(
                S3_ENDPOINT,
                S3Location("blobs", "hammal/"),
                S3Credentials("AKIDEXAMPLE", "secret"),
                s3,
                test.clock,
            )
            storage = S3BlobStorage(store, objects, StoreHealth(test.clock))
        self.blobs = BlobCache(storage, test.clock, read_timeout=30.0, resumes=3)
        auth = PeerAuth(key, test.clock)
        self.peer_http = StubTreq(peer if peer is not None else Refusing())
        if leases:
            # A cluster node, as build_cluster joins it.
            self.blobs.fill_sources = ClusterFills(
                test.clock,
                storage,
                FillLeases(test.redis, test.clock, self.url, ttl=5.0),
                PeerClient(self.peer_http, auth, test.clock),
            )
        else:
            # --storage s3 alone, as build_app joins it.
            self.blobs.fill_sources = ReadThrough(storage)
        self.root = Resource()
        mount_peer_endpoint(self.root, PeerBlobResource(peer_lookup(self.blobs), auth, test.clock))
        test.stubs.append(self.peer_http)

    def fill(self, test: "ClusterFillTests") -> BlobFetch:
        def start(offset: int, end: int | None = None) -> Any:
            headers = {b"range": [b"bytes=%d-" % offset]} if offset else {}
            return test.upstream_http.get(
                "http://upstream.test/blob", headers=headers, unbuffered=True
            )

        fetch, joined = self.blobs.fetch(DIGEST, start, "upstream.test")
        test.assertFalse(joined)
        return fetch

    def stored(self) -> bytes | None:
        path = self.blobs.store.path(DIGEST)
        if not os.path.exists(path):
            return None
        with open(path, "rb") as f:
            return f.read()


class ClusterFillTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.upstream = Upstream(BLOB)
        self.upstream_http = StubTreq(self.upstream)
        self.s3 = FakeS3("blobs")
        self.s3_http = StubTreq(self.s3)
        self.stubs: list[StubTreq] = [self.upstream_http, self.s3_http]

    def settle(self, rounds: int = 60) -> None:
        """Let every in-memory connection and zero-delay call run."""
        for _ in range(rounds):
            for stub in self.stubs:
                stub.flush()
            self.clock.advance(0)

    def s3_object(self) -> bytes | None:
        return self.s3.objects.get("hammal/" + object_key("blobs", str(DIGEST)))

    def test_fill_uploads_then_releases_the_lease(self) -> None:
        """
        The holder fills from upstream, uploads the bytes to the store in
        parts, completes the object once verified, then frees the lease.
        """
        node = Node(self, "a", s3=self.s3_http)
        fetch = node.fill(self)
        self.settle()
        self.assertTrue(fetch.complete)
        self.assertEqual(node.stored(), BLOB)
        self.assertEqual(self.s3_object(), BLOB)
        self.assertEqual(self.s3.uploads, {})
        self.assertEqual(self.upstream.gets, [None])
        self.assertIsNone(self.redis._live(KEY_PREFIX + str(DIGEST)))

    def test_mismatch_never_reaches_the_store(self) -> None:
        """Bytes that fail the digest are aborted: no object, no pending upload."""
        self.upstream.data = b"\0" + BLOB[1:]
        node = Node(self, "a", s3=self.s3_http)
        fetch = node.fill(self)
        self.settle()
        self.assertIsNotNone(fetch.failure)
        self.assertIsNone(self.s3_object())
        self.assertEqual(self.s3.uploads, {})
        self.assertIsNone(self.redis._live(KEY_PREFIX + str(DIGEST)))

    def test_second_node_reads_through_the_store(self) -> None:
        """A node with an empty directory fills from the store, not upstream."""
        Node(self, "a", s3=self.s3_http).fill(self)
        self.settle()
        fresh = Node(self, "b", s3=self.s3_http)
        fetch = fresh.fill(self)
        self.settle()
        self.assertTrue(fetch.complete)
        self.assertEqual(fresh.stored(), BLOB)
        self.assertEqual(self.upstream.gets, [None])

    def test_streams_from_the_lease_holder(self) -> None:
        """
        While A fills, B finds A's lease and streams the growing file from
        A's peer endpoint: one upstream fetch for both.
        """
        self.upstream.hold = True
        a = Node(self, "a")
        b = Node(self, "b", peer=a.root)
        first = a.fill(self)
        self.settle()
        self.assertGreater(first.written, 0)
        second = b.fill(self)
        self.settle()
        self.assertGreater(second.written, 0)
        self.assertFalse(second.verified)
        self.upstream.release()
        self.settle(200)
        self.assertTrue(first.complete)
        self.assertTrue(second.complete)
        self.assertEqual(b.stored(), BLOB)
        self.assertEqual(self.upstream.gets, [None])

    def test_dead_holder_is_taken_over(self) -> None:
        """
        A lease whose holder is gone (its peer endpoint refuses) is waited
        out; then B takes it and fills from upstream.
        """
        before = metrics.cluster_fill_sources.labels("upstream")._value.get()
        self.redis.data[KEY_PREFIX + str(DIGEST)] = ("http://dead.test:5000", 4.0)
        b = Node(self, "b")
        fetch = b.fill(self)
        self.settle()
        self.assertEqual(self.upstream.gets, [])
        self.assertFalse(fetch.complete)
        for _ in range(20):
            self.clock.advance(0.25)
            self.settle(5)
        self.settle()
        self.assertTrue(fetch.complete)
        self.assertEqual(b.stored(), BLOB)
        self.assertEqual(self.upstream.gets, [None])
        self.assertEqual(metrics.cluster_fill_sources.labels("upstream")._value.get(), before + 1)

    def test_store_down_fills_locally(self) -> None:
        """A store that fails every request costs a warning and a metric, not the pull."""
        before = metrics.object_store_failures.labels("read")._value.get()
        broken = StubTreq(Refusing())
        self.stubs.append(broken)
        node = Node(self, "a", s3=broken)
        fetch = node.fill(self)
        self.settle()
        self.assertTrue(fetch.complete)
        self.assertEqual(node.stored(), BLOB)
        self.assertGreater(metrics.object_store_failures.labels("read")._value.get(), before)

    def test_redis_down_fills_locally(self) -> None:
        """Without Redis every node fills alone (a local lease), never failing."""
        self.redis.down = True
        node = Node(self, "a")
        fetch = node.fill(self)
        self.settle()
        self.assertTrue(fetch.complete)
        self.assertEqual(node.stored(), BLOB)

    def test_holder_failing_mid_fill_is_taken_over_with_range(self) -> None:
        """
        A's fill fails half-way (its bytes fail the digest): B, which
        streamed the first half from A, takes the lease over, resumes from
        upstream with C{Range} where it was, ends with exact bytes and
        stores the blob once; A's upload is aborted.
        """
        self.upstream.hold = True
        a = Node(self, "a", s3=self.s3_http)
        b = Node(self, "b", peer=a.root, s3=self.s3_http)
        first = a.fill(self)
        self.settle()
        second = b.fill(self)
        self.settle()
        half = second.written
        self.assertGreater(half, 0)
        self.upstream.hold = False
        self.upstream.release(corrupt=True)
        self.settle(200)
        self.assertIsNotNone(first.failure)
        self.assertTrue(second.complete)
        self.assertEqual(b.stored(), BLOB)
        self.assertEqual(self.upstream.gets, [None, b"bytes=%d-" % half])
        self.assertEqual(self.s3_object(), BLOB)
        self.assertEqual(self.s3.uploads, {})
        completions = [r for r in self.s3.requests if r[0] == "POST" and "uploadId=" in r[1]]
        self.assertEqual(len(completions), 1)

    def test_peer_with_another_key_is_not_waited_for(self) -> None:
        """A holder that refuses our signature (another cluster key): B goes upstream."""
        self.upstream.hold = True
        a = Node(self, "a")
        b = Node(self, "b", peer=a.root, key=generate_key())
        first = a.fill(self)
        self.settle()
        second = b.fill(self)
        self.settle()
        self.assertEqual(self.upstream.gets, [None, None])
        self.upstream.release()
        self.settle(200)
        self.assertTrue(first.complete)
        self.assertTrue(second.complete)
        self.assertEqual(b.stored(), BLOB)

    def test_upstream_failure_is_not_the_stores(self) -> None:
        """A fill that fails upstream before a byte frees the lease and blames no store."""
        before = metrics.object_store_failures.labels("upload")._value.get()
        self.upstream.data = b""
        node = Node(self, "a", s3=self.s3_http)
        self.upstream.isLeaf = True
        self.upstream.render_GET = lambda request: _not_found(request)  # type: ignore[method-assign]
        fetch = node.fill(self)
        self.settle()
        self.assertIsNotNone(fetch.failure)
        self.assertEqual(metrics.object_store_failures.labels("upload")._value.get(), before)
        self.assertEqual(self.s3.uploads, {})
        self.assertIsNone(self.redis._live(KEY_PREFIX + str(DIGEST)))

    def test_store_without_a_cluster(self) -> None:
        """--storage s3 alone: fills upload, and another instance reads through the store."""
        first = Node(self, "a", s3=self.s3_http, leases=False)
        first.fill(self)
        self.settle()
        self.assertEqual(self.s3_object(), BLOB)
        self.assertEqual(self.redis.calls, [])
        second = Node(self, "b", s3=self.s3_http, leases=False)
        fetch = second.fill(self)
        self.settle()
        self.assertTrue(fetch.complete)
        self.assertEqual(second.stored(), BLOB)
        self.assertEqual(self.upstream.gets, [None])


def _not_found(request: Request) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"content-type", b"application/json")
    return b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'

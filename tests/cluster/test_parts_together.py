"""
The cluster's parts composed by hand (hammal composes them in
L{hammal.cluster.setup}), against
real redis-server and SeaweedFS and over real TCP: two instances, one fill
lease, one upstream-like producer, the other instance streaming from the
holder's peer endpoint, and the S3 object completed only for a matching
digest.
"""

from __future__ import annotations

import hashlib
from typing import Any

import treq
import txredisapi
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import Site

from hammal.cluster.lease import FillLeases, HeldElsewhere, Lease
from hammal.cluster.peer import GrowingFile, PeerBlobResource, PeerClient, mount_peer_endpoint
from hammal.cluster.peerauth import PeerAuth, generate_key
from hammal.storage.objects import object_key
from hammal.storage.s3 import S3Credentials, S3Location, S3Store
from tests.cluster.fakes import Fill
from tests.cluster.harness import require_binaries, shared_seaweedfs
from tests.integration.environment import REDIS_BIN, RedisServer, make_tempdir

MiB = 1024 * 1024


class Node:
    """One instance's cluster parts."""

    def __init__(self, test: "PartsTogetherTests", key: bytes) -> None:
        self.files: dict[str, GrowingFile] = {}
        auth = PeerAuth(key, reactor)
        root = Resource()
        mount_peer_endpoint(root, PeerBlobResource(self.files.get, auth, reactor))
        port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"
        redis = txredisapi.lazyConnectionPool(
            host="127.0.0.1", port=test.redis.port, poolsize=2, connectTimeout=1, replyTimeout=1
        )
        test.addCleanup(redis.disconnect)
        self.leases = FillLeases(redis, reactor, self.url, ttl=2.0)
        self.peers = PeerClient(test.http, auth, reactor)
        self.store = S3Store(
            test.s3.endpoint,
            S3Location("hammal-cluster", test.id().rsplit(".", 1)[-1] + "/"),
            S3Credentials.from_environ(test.s3.environ()),
            test.http,
            reactor,
        )


class PartsTogetherTests(TestCase):
    timeout = 120

    def setUp(self) -> Any:
        require_binaries(REDIS_BIN)
        self.s3 = shared_seaweedfs()
        self.redis = RedisServer(make_tempdir("hammal-parts-")).start()
        self.addCleanup(self.redis.stop)
        self.redis.wait_ready()
        pool = HTTPConnectionPool(reactor)
        pool.maxPersistentPerHost = 8
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        key = generate_key()
        self.a, self.b = Node(self, key), Node(self, key)
        return self.a.store.create_bucket()

    @inlineCallbacks
    def fill(self, node: Node, lease: Lease, data: bytes, digest: str, corrupt: bool) -> Any:
        """What a holder does: upstream bytes to the cache file and to S3."""
        fill = Fill(self.mktemp(), len(data))
        node.files[digest] = fill.growing()
        upload = node.store.open_upload(object_key("blobs", digest))
        hasher = hashlib.sha256()
        for offset in range(0, len(data), MiB):
            chunk = data[offset : offset + MiB]
            if corrupt and offset == 4 * MiB:
                chunk = b"\0" * len(chunk)
            hasher.update(chunk)
            fill.append(chunk)
            yield upload.write(chunk)
            yield deferLater(reactor, 0.01, lambda: None)
        if "sha256:" + hasher.hexdigest() == digest:
            yield upload.complete()
            fill.end(len(data))
        else:
            yield upload.abort()
            fill.end(ValueError("digest mismatch"))
        yield lease.release()

    @inlineCallbacks
    def test_one_fill_streamed_to_the_other_instance(self) -> Any:
        data = hashlib.sha256(b"layer").digest() * (10 * MiB // 32)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        lease = yield self.a.leases.acquire(digest)
        self.assertIsInstance(lease, Lease)
        filling = self.fill(self.a, lease, data, digest, corrupt=False)
        held = yield self.b.leases.acquire(digest)
        self.assertEqual(held, HeldElsewhere(digest, self.a.url))
        response = yield self.b.peers.fetch(held.holder, digest)
        body = yield treq.content(response)
        yield filling
        self.assertEqual(hashlib.sha256(body).hexdigest(), digest.split(":")[1])
        key = object_key("blobs", digest)
        self.assertEqual((yield self.b.store.size(key)), len(data))
        self.assertIsNone((yield self.b.leases.holder(digest)))

    @inlineCallbacks
    def test_mismatch_reaches_neither_s3_nor_the_peer(self) -> Any:
        data = hashlib.sha256(b"bad layer").digest() * (9 * MiB // 32)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        lease = yield self.a.leases.acquire(digest)
        filling = self.fill(self.a, lease, data, digest, corrupt=True)
        held = yield self.b.leases.acquire(digest)
        response = yield self.b.peers.fetch(held.holder, digest)
        with self.assertRaises(ResponseFailed):
            yield treq.content(response)
        yield filling
        self.assertFalse((yield self.b.store.exists(object_key("blobs", digest))))
        # The lease is free: the other instance may try upstream itself.
        retry = yield self.b.leases.acquire(digest)
        self.assertIsInstance(retry, Lease)
        yield retry.release()

"""
Tests for L{hammal.cluster.setup}: the cluster parts built from settings and
joined to the blob cache, and the peer endpoint as build_app mounts it.
"""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from hammal.cache.blobs import BlobCache
from hammal.cache.store import BlobStore
from hammal.cluster.fill import ClusterFills
from hammal.cluster.peer import PEER_PATH, mount_peer_endpoint
from hammal.cluster.peerauth import PeerAuth
from hammal.cluster.setup import build_cluster
from hammal.config import ConfigError, Settings
from hammal.storage.s3 import S3Location
from tests.cluster.fakes import FakeRedis

KEY = b"k" * 40
DIGEST = "sha256:" + "a" * 64


class BuildClusterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        store = BlobStore(self.mktemp())
        store.open()
        self.blobs = BlobCache(store, self.clock, 30.0, 3)
        self.key_file = self.mktemp()
        with open(self.key_file, "wb") as f:
            f.write(KEY)

    def test_alone(self) -> None:
        """Without --cluster-advertise, nothing is built or joined (--storage s3 or not)."""
        self.assertIsNone(build_cluster(Settings(), self.clock, None, self.blobs))
        storage_only = Settings(storage=S3Location("b", "p/"), s3_endpoint="http://s3.test")
        self.assertIsNone(build_cluster(storage_only, self.clock, None, self.blobs))
        self.assertIsNone(self.blobs.fill_sources)

    def test_cluster_needs_a_key(self) -> None:
        """--cluster-advertise without --cluster-key-file is a start-up error."""
        settings = Settings(cluster_advertise="http://10.0.0.1:5000")
        with self.assertRaises(ConfigError) as raised:
            build_cluster(settings, self.clock, None, self.blobs, StubTreq(Resource()))
        self.assertIn("--cluster-key-file", str(raised.exception))

    def test_cluster_node(self) -> None:
        """
        A cluster node's fills go through the cluster's sources, and its peer
        endpoint answers a signed request and refuses an unsigned one.
        """
        settings = Settings(
            cluster_advertise="http://10.0.0.1:5000",
            cluster_key_file=self.key_file,
        )
        cluster = build_cluster(
            settings, self.clock, FakeRedis(self.clock), self.blobs, StubTreq(Resource())
        )
        assert cluster is not None
        self.assertIsInstance(self.blobs.fill_sources, ClusterFills)
        self.assertIs(self.blobs.fill_sources, cluster.fills)
        self.assertIs(cluster.fills.storage, self.blobs.store)
        self.assertIsNotNone(cluster.fills.leases)
        root = Resource()
        mount_peer_endpoint(root, cluster.peer_endpoint)
        http = StubTreq(root)
        url = "http://node.test" + PEER_PATH + DIGEST
        unsigned = self.successResultOf(http.get(url))
        self.assertEqual(unsigned.code, 401)
        signature = PeerAuth(KEY, self.clock).sign(b"GET", (PEER_PATH + DIGEST).encode())
        signed = self.successResultOf(http.get(url, headers={b"authorization": [signature]}))
        self.assertEqual(signed.code, 404)  # signed, but not here

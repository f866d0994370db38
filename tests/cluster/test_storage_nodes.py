"""
Two hammal instances (twistd processes) sharing only an S3 store
(C{--storage s3://...}: no Redis, no cluster), against real SeaweedFS and
the throttled registry of L{tests.cluster.rig}: the blob cache's storage
is the local directory over the bucket (L{hammal.storage.blobs}).

* the first instance's fill is uploaded as it streams and completed once
  verified; the second, with an empty directory, reads it through from
  the bucket: one upstream fetch for both, exact bytes;
* bytes that fail their digest are never completed in the bucket.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.cluster.rig import ClusterRig, MiB
from tests.integration.environment import http_get_digest, http_request

REPOSITORY = "team/app"


class StorageNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = ClusterRig(nodes=2, storage_only=True).start()
        self.addCleanup(self.rig.stop)

    def get(self, base: str, digest: str) -> tuple[int, str, int]:
        """GET the blob: status, digest and size of what came."""
        url = f"{base}/v2/{REPOSITORY}/blobs/{digest}"
        try:
            response, got, size = http_get_digest(url, timeout=60)
        except Exception as e:  # noqa: BLE001 - a broken transfer is a result here
            return 0, f"broken: {e!r}", 0
        return response.status, got, size

    def metric(self, node: Any, label: str) -> float:
        name = "hammal_cluster_fill_sources_total"
        text = http_request("GET", node.url + "/metrics", timeout=10).body.decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and label in line
        )

    def test_read_through_the_bucket(self) -> None:
        rig = self.rig
        size = 6 * MiB
        digest = rig.add_blob(size, b"shared")
        first, second = rig.nodes
        self.assertEqual(self.get(first.url, digest), (200, digest, size), rig.logs())
        rig.wait_stored(digest)
        self.assertEqual(rig.stored(digest), (200, digest))
        self.assertEqual(self.get(second.url, digest), (200, digest, size), rig.logs())
        self.assertEqual(rig.upstream_gets(digest), [None], rig.logs())
        from_bucket = self.metric(second, 'source="store"')
        self.assertGreaterEqual(from_bucket, 1.0, rig.logs())
        # Now in the second one's directory: a hit, neither upstream nor the bucket.
        self.assertEqual(self.get(second.url, digest), (200, digest, size), rig.logs())
        self.assertEqual(self.metric(second, 'source="store"'), from_bucket, rig.logs())
        self.assertEqual(rig.upstream_gets(digest), [None], rig.logs())

    def test_mismatch_never_completed_in_the_bucket(self) -> None:
        rig = self.rig
        size = 3 * MiB
        digest = rig.add_blob(size, b"honest")
        path = os.path.join(rig.blobs, digest[7:])
        with open(path, "r+b") as f:  # upstream now serves other bytes under that digest
            f.seek(size // 2)
            f.write(b"\0" * 1024)
        with open(path, "rb") as f:
            self.assertNotEqual("sha256:" + hashlib.sha256(f.read()).hexdigest(), digest)
        status, got, _ = self.get(rig.nodes[0].url, digest)
        self.assertNotEqual((status, got), (200, digest))
        self.assertEqual(rig.stored(digest)[0], 404, rig.logs())
        # The next instance does not find it either: it goes upstream again.
        self.get(rig.nodes[1].url, digest)
        self.assertEqual(rig.stored(digest)[0], 404, rig.logs())
        self.assertEqual(len(rig.upstream_gets(digest)), 2, rig.logs())

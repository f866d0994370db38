"""
Three hammal instances (twistd processes) as one mirror, against real
parts (L{tests.cluster.rig}): redis-server for the fill leases, SeaweedFS as
the S3 store, HAProxy round-robin in front, and a throttled registry that
logs every request.

* 12 concurrent cold GETs of one large blob through HAProxy cause exactly
  one upstream fetch and every body is exact; then every node serves it
  warm, including a node restarted with an empty local directory (it reads
  through S3), still with that one upstream fetch; a manifest by digest
  too.
* three concurrent cold skopeo pulls through HAProxy: one upstream fetch
  of the layer.
* kill -9 of the lease holder mid-fill: every client behind HAProxy, and
  every client of the other nodes, ends with exact bytes (retrying a
  transfer that broke), the fill is taken over with C{Range}, and the blob
  is in S3 once, verified.
* Redis and S3 both gone: pulls still succeed, at most one upstream fetch
  per node, and C{hammal_object_store_failures} counts the store's failures.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.cluster.harness import require_binaries
from tests.cluster.rig import ClusterRig, MiB
from tests.integration.environment import (
    SKOPEO_BIN,
    http_get_digest,
    http_request,
    make_tempdir,
    skopeo_pull,
    wait_until,
)

REPOSITORY = "team/app"


class ClusterNodesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rig = ClusterRig(nodes=3).start()
        self.addCleanup(self.rig.stop)

    def get(self, base: str, digest: str, attempts: int = 1) -> tuple[str, int]:
        """GET the blob, retrying a broken transfer; the digest and size of the last try."""
        url = f"{base}/v2/{REPOSITORY}/blobs/{digest}"
        last: Any = None
        for _ in range(attempts):
            try:
                response, got, size = http_get_digest(url, timeout=60)
            except Exception as e:  # a transfer broken mid-body: retry
                last = e
                continue
            if response.status == 200 and got == digest:
                return got, size
            last = (response.status, got, size)
        return f"failed: {last!r}", 0

    def metric(
        self, node: Any, label: str, name: str = "hammal_cluster_fill_sources_total"
    ) -> float:
        """The sum of C{node}'s C{name} series whose labels contain C{label}."""
        text = http_request("GET", node.url + "/metrics", timeout=10).body.decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and label in line
        )

    def manifest(self, base: str, digest: str) -> bytes:
        response = http_request(
            "GET",
            f"{base}/v2/{REPOSITORY}/manifests/{digest}",
            [("Accept", "application/vnd.oci.image.manifest.v1+json")],
            timeout=30,
        )
        self.assertEqual(response.status, 200, response.describe())
        return response.body

    def test_one_upstream_fetch_then_warm_everywhere(self) -> None:
        rig = self.rig
        size = 24 * MiB
        digest = rig.add_blob(size, b"cold")
        manifest, manifest_body = rig.add_manifest(digest, size)
        self.assertEqual(self.manifest(rig.nodes[0].url, manifest), manifest_body)
        rig.wait_stored(manifest, "manifests")
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: self.get(rig.haproxy.url, digest), range(12)))
        self.assertEqual(results, [(digest, size)] * 12, rig.logs())
        self.assertEqual(rig.upstream_gets(digest), [None], rig.logs())
        rig.wait_stored(digest)
        self.assertEqual(rig.stored(digest), (200, digest))
        for node in rig.nodes:
            self.assertEqual(self.get(node.url, digest), (digest, size), rig.logs())
        restarted = rig.nodes[2]
        restarted.stop()
        restarted.start(empty_cache=True).wait_ready()
        self.assertEqual(self.get(restarted.url, digest), (digest, size), rig.logs())
        self.assertEqual(rig.upstream_gets(digest), [None], rig.logs())
        # Manifests by digest are in S3 too: the empty node needs no upstream.
        self.assertEqual(self.manifest(restarted.url, manifest), manifest_body)
        self.assertEqual(rig.upstream_gets(manifest), [None], rig.logs())

    def test_lease_holder_killed_mid_fill(self) -> None:
        rig = self.rig
        size = 48 * MiB  # four seconds at the upstream's rate
        digest = rig.add_blob(size, b"killed")
        key = "hammal:v1:lease:" + digest
        bases = [n.url for n in rig.nodes] * 2 + [rig.haproxy.url] * 3
        with ThreadPoolExecutor(len(bases)) as pool:
            pending = [pool.submit(self.get, base, digest, 3) for base in bases]
            holder = None

            def held() -> bool:
                nonlocal holder
                reply = rig.redis.command("GET", key)
                if reply.startswith(b"$") and not reply.startswith(b"$-1"):
                    holder = reply.split(b"\r\n")[1].decode()
                return holder is not None

            wait_until(held, "a fill lease", 30)
            victim = next(n for n in rig.nodes if n.url == holder)
            others = [n for n in rig.nodes if n is not victim]
            # Mid-fill: the other nodes stream from the holder (4 s in all).
            wait_until(
                lambda: all(self.metric(n, 'source="peer"') >= 1 for n in others),
                "the other nodes streaming from the holder",
                30,
            )
            victim.kill()
            results = [p.result(timeout=120) for p in pending]
        # The killed node's own clients retried there in vain (it is gone);
        # every other client, and every one behind HAProxy, got exact bytes.
        for base, result in zip(bases, results):
            if base != victim.url:
                self.assertEqual(result, (digest, size), rig.logs())
        # One fetch, and the takeover's resume from where the cluster was.
        gets = rig.upstream_gets(digest)
        self.assertEqual(gets[0], None, gets)
        self.assertGreaterEqual(len(gets), 2, gets)
        self.assertTrue(all(r is not None and r.startswith("bytes=") for r in gets[1:]), gets)
        rig.wait_stored(digest)
        self.assertEqual(rig.stored(digest), (200, digest))
        for node in rig.nodes:
            if node is not victim:
                self.assertEqual(self.get(node.url, digest), (digest, size), rig.logs())

    def test_skopeo_pulls_through_haproxy(self) -> None:
        """Three concurrent cold skopeo pulls of one image: one upstream fetch per blob."""
        require_binaries(SKOPEO_BIN)
        rig = self.rig
        size = 16 * MiB
        layer = rig.add_blob(size, b"skopeo")
        manifest, _ = rig.add_manifest(layer, size)
        source = f"127.0.0.1:{rig.haproxy.port}/{REPOSITORY}@{manifest}"
        destinations = [make_tempdir("hammal-skopeo-") for _ in range(3)]
        with ThreadPoolExecutor(3) as pool:
            pulls = list(pool.map(lambda d: skopeo_pull(source, d), destinations))
        for pull in pulls:
            self.assertEqual(pull.returncode, 0, pull.stderr + rig.logs())
        for destination in destinations:
            with open(os.path.join(destination, layer[7:]), "rb") as f:
                self.assertEqual("sha256:" + hashlib.sha256(f.read()).hexdigest(), layer)
        self.assertEqual(rig.upstream_gets(layer), [None], rig.logs())

    def test_redis_and_s3_lost(self) -> None:
        """
        With Redis and the S3 store gone, pulls still succeed: each node
        fetches alone (at most one upstream fetch per node), and the store's
        failures show in the metric.
        """
        rig = self.rig
        size = 8 * MiB
        digest = rig.add_blob(size, b"alone")
        rig.redis.stop()
        assert rig.s3.process is not None
        rig.s3.process.kill()  # shared_seaweedfs() starts a new one for later tests
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: self.get(rig.haproxy.url, digest), range(6)))
        self.assertEqual(results, [(digest, size)] * 6, rig.logs())
        self.assertLessEqual(len(rig.upstream_gets(digest)), len(rig.nodes))
        failures = sum(self.metric(n, "", "hammal_object_store_failures_total") for n in rig.nodes)
        self.assertGreater(failures, 0)

"""
A manifest is only useful with its blobs: serving a cached manifest keeps
its layers last in line for eviction, and a layer missing while the
manifest is served stale is answered with a clear 503.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.layers import LayerKeeper, referenced_blobs
from hammal.cache.store import BlobStore
from hammal.reference import Digest
from tests.fakes import MANIFEST_V2
from tests.test_v2 import Mirror, header

ACCEPT = {b"accept": [MANIFEST_V2.encode()]}


def manifest(*blobs: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": blobs[0],
                "size": 1,
            },
            "layers": [
                {"mediaType": "application/octet-stream", "digest": d, "size": 1} for d in blobs[1:]
            ],
        }
    ).encode()


class LayerKeeperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = BlobStore(self.mktemp(), max_size=250)
        self.store.open()

    def put(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        temporary = self.store.temporary_path(digest)
        with open(temporary, "wb") as f:
            f.write(data)
        self.store.commit(temporary, digest)
        return digest

    def test_served_manifest_keeps_its_layers(self) -> None:
        """The blobs of a manifest being served outlive newer unreferenced ones."""
        config, layer = self.put(b"c" * 20), self.put(b"l" * 80)
        other = self.put(b"o" * 100)
        keeper = LayerKeeper(self.store, self.clock)
        keeper.served("sha256:" + "0" * 64, MANIFEST_V2, manifest(str(config), str(layer)))
        self.put(b"n" * 100)  # over 250 bytes: someone goes
        self.assertIn(config, self.store)
        self.assertIn(layer, self.store)
        self.assertNotIn(other, self.store)

    def test_throttled_per_manifest(self) -> None:
        touched: list[Digest] = []
        self.store.touch = touched.append  # type: ignore[method-assign]
        keeper = LayerKeeper(self.store, self.clock, interval=60)
        body = manifest("sha256:" + "a" * 64, "sha256:" + "b" * 64)
        for _ in range(5):
            keeper.served("sha256:" + "0" * 64, MANIFEST_V2, body)
        self.assertEqual(len(touched), 2)
        self.clock.advance(60)
        keeper.served("sha256:" + "0" * 64, MANIFEST_V2, body)
        self.assertEqual(len(touched), 4)

    def test_indexes_and_garbage_name_no_blobs(self) -> None:
        self.assertEqual(referenced_blobs(b"not json"), [])
        self.assertEqual(referenced_blobs(b'{"layers": [{"digest": "nope"}]}'), [])
        keeper = LayerKeeper(self.store, self.clock)
        keeper.served("x", "application/vnd.oci.image.index.v1+json", b'{"manifests": []}')

    def test_stale_memory(self) -> None:
        keeper = LayerKeeper(self.store, self.clock, stale_memory=600)
        layer = Digest.parse("sha256:" + "b" * 64)
        keeper.served("m", MANIFEST_V2, manifest("sha256:" + "a" * 64, str(layer)))
        self.assertFalse(keeper.named_by_stale(layer))
        keeper.served("m", MANIFEST_V2, manifest("sha256:" + "a" * 64, str(layer)), stale=True)
        self.assertTrue(keeper.named_by_stale(layer))
        self.clock.advance(600)
        self.assertFalse(keeper.named_by_stale(layer))


class MissingLayerOfStaleManifestTests(SynchronousTestCase):
    def test_clear_error_for_a_missing_layer(self) -> None:
        mirror = Mirror(cache_dir=self.mktemp(), retries=0)
        config = mirror.world.add_blob(b'{"os":"linux"}')
        cached = mirror.world.add_blob(b"cached layer" * 100)
        missing = mirror.world.add_blob(b"never pulled" * 100)
        mirror.world.add_image("library/alpine", "3.20", manifest(config, cached, missing))
        self.assertEqual(mirror.request(b"GET", "/v2/alpine/manifests/3.20", ACCEPT).code, 200)
        for blob in (config, cached):
            mirror.body(mirror.request(b"GET", f"/v2/alpine/blobs/{blob}"))
        mirror.clock.advance(301)
        mirror.world.faults = [503] * 50  # upstream down
        stale = mirror.request(b"GET", "/v2/alpine/manifests/3.20", ACCEPT)
        self.assertEqual(header(stale, b"cache-status"), "hammal; fwd=stale; detail=stale-if-error")
        self.assertEqual(mirror.request(b"GET", f"/v2/alpine/blobs/{cached}").code, 200)
        response = mirror.request(b"GET", f"/v2/alpine/blobs/{missing}")
        self.assertEqual(response.code, 503)
        self.assertEqual(header(response, b"retry-after"), "30")
        error = json.loads(mirror.body(response))["errors"][0]
        self.assertIn("not in this mirror's cache", error["message"])
        self.assertIn("served stale", error["message"])
        self.assertEqual(error["detail"], {"digest": missing})

    def test_other_blobs_keep_upstreams_error(self) -> None:
        """A blob no stale manifest names: upstream's failure as before (502)."""
        mirror = Mirror(cache_dir=self.mktemp(), retries=0)
        blob = mirror.world.add_blob(b"x" * 100)
        mirror.world.faults = [503] * 50
        self.assertEqual(mirror.request(b"GET", f"/v2/alpine/blobs/{blob}").code, 502)

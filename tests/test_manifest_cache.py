"""
Tests for the manifest side of the cache through the ``/v2/`` resource:
TTL, revalidation by HEAD, stale-if-error, negative caching, coalescing,
content negotiation and multi-arch indexes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.fakes import MANIFEST_V2, REGISTRY, sha256
from tests.test_v2 import Mirror, header

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {b"accept": [MANIFEST_V2.encode(), OCI_INDEX.encode(), OCI_MANIFEST.encode()]}


class ManifestCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = Mirror(cache_dir=self.mktemp(), retries=0)
        self.body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","v":1}'
        self.digest = self.mirror.world.add_image("library/alpine", "3.20", self.body)

    def get(self, reference: str = "3.20", method: bytes = b"GET", headers: Any = ACCEPT) -> Any:
        return self.mirror.request(method, f"/v2/alpine/manifests/{reference}", headers)

    def manifest_requests(self) -> list[str]:
        return [
            f"{s.method} {s.path}"
            for s in self.mirror.world.hits(REGISTRY, "/manifests/")
            if s.header("authorization")
        ]

    def test_tag_fresh_within_ttl(self) -> None:
        """Within --manifest-ttl a tag is answered without asking upstream."""
        first = self.get()
        self.assertEqual(header(first, b"cache-status"), "hammal; fwd=miss")
        self.assertEqual(self.mirror.body(first), self.body)
        self.mirror.clock.advance(299)
        second = self.get()
        self.assertEqual(header(second, b"cache-status"), "hammal; hit")
        self.assertEqual(self.mirror.body(second), self.body)
        self.assertEqual(header(second, b"docker-content-digest"), self.digest)
        self.assertEqual(header(second, b"content-type"), MANIFEST_V2)
        self.assertEqual(len(self.manifest_requests()), 1)

    def test_head_from_cache(self) -> None:
        """containerd's HEAD by tag gets digest and length from the cache."""
        self.mirror.body(self.get())
        head = self.get(method=b"HEAD")
        self.assertEqual(header(head, b"content-length"), str(len(self.body)))
        self.assertEqual(header(head, b"docker-content-digest"), self.digest)
        self.assertEqual(len(self.manifest_requests()), 1)

    def test_revalidates_with_head_after_ttl(self) -> None:
        """After the TTL a HEAD checks the tag; unchanged means no GET."""
        self.mirror.body(self.get())
        self.mirror.clock.advance(301)
        again = self.get()
        self.assertEqual(header(again, b"cache-status"), "hammal; fwd=stale; fwd-status=200")
        self.assertEqual(self.mirror.body(again), self.body)
        self.assertEqual([r.split()[0] for r in self.manifest_requests()], ["GET", "HEAD"])
        self.mirror.clock.advance(100)
        self.assertEqual(header(self.get(), b"cache-status"), "hammal; hit")

    def test_moved_tag_fetched(self) -> None:
        """When the digest changed upstream, the new manifest is fetched."""
        self.mirror.body(self.get())
        new_body = self.body.replace(b'"v":1', b'"v":2')
        new_digest = self.mirror.world.add_image("library/alpine", "3.20", new_body)
        self.mirror.clock.advance(301)
        moved = self.get()
        self.assertEqual(header(moved, b"docker-content-digest"), new_digest)
        self.assertEqual(self.mirror.body(moved), new_body)

    def test_stale_if_error(self) -> None:
        """Upstream failing after the TTL: the known tag is served with a Warning."""
        self.mirror.body(self.get())
        self.mirror.clock.advance(301)
        self.mirror.world.faults = [503]
        stale = self.get()
        self.assertEqual(stale.code, 200)
        self.assertEqual(header(stale, b"warning"), '110 - "Response is Stale"')
        self.assertEqual(header(stale, b"cache-status"), "hammal; fwd=stale; detail=stale-if-error")
        self.assertEqual(self.mirror.body(stale), self.body)

    def test_stale_if_error_on_rate_limit(self) -> None:
        self.mirror.body(self.get())
        self.mirror.clock.advance(301)
        self.mirror.world.faults = [429]
        self.mirror.world.retry_after = "3600"
        self.assertEqual(self.get().code, 200)

    def test_too_stale_fails(self) -> None:
        """Past --stale-if-error the upstream error is the answer."""
        self.mirror.body(self.get())
        self.mirror.clock.advance(300 + 3600 + 1)
        self.mirror.world.faults = [503]
        self.assertEqual(self.get().code, 502)

    def test_negative_cache(self) -> None:
        """A 404 is remembered for --negative-ttl: a typo loop costs one request."""
        for _ in range(5):
            self.assertEqual(self.get("nope").code, 404)
        self.assertEqual(len(self.manifest_requests()), 1)
        self.mirror.clock.advance(31)
        self.assertEqual(self.get("nope").code, 404)
        self.assertEqual(len(self.manifest_requests()), 2)

    def test_404_on_revalidation_not_served_stale(self) -> None:
        """A tag deleted upstream is not served from cache."""
        self.mirror.body(self.get())
        del self.mirror.world.manifests[("library/alpine", "3.20")]
        self.mirror.clock.advance(301)
        self.assertEqual(self.get().code, 404)

    def test_digest_cached_for_good(self) -> None:
        self.mirror.body(self.get(self.digest))
        self.mirror.clock.advance(10**6)
        again = self.get(self.digest)
        self.assertEqual(header(again, b"cache-status"), "hammal; hit")
        self.assertEqual(len(self.manifest_requests()), 1)

    def test_accept_keys_the_cache(self) -> None:
        """A client that does not accept the cached type is not given it."""
        self.mirror.body(self.get(self.digest))
        oci_only = {b"accept": [OCI_MANIFEST.encode()]}
        response = self.get(self.digest, headers=oci_only)
        self.assertNotEqual(header(response, b"cache-status"), "hammal; hit")
        self.assertEqual(len(self.manifest_requests()), 2)

    def test_no_accept_bypasses(self) -> None:
        """Without manifest types in Accept, upstream decides (schema1 conversion)."""
        response = self.get(headers={})
        self.assertEqual(header(response, b"cache-status"), "hammal; fwd=bypass")

    def test_concurrent_tag_requests_coalesce(self) -> None:
        pending = [
            self.mirror.agent.request(
                b"GET", b"http://mirror.test/v2/alpine/manifests/3.20", _headers(ACCEPT)
            )
            for _ in range(10)
        ]
        self.mirror.flush()
        for d in pending:
            self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(self.manifest_requests()), 1)

    def test_index_children_prefetched(self) -> None:
        """An index brings its children into the cache: later fetch by digest is offline."""
        children = []
        for arch in ("amd64", "arm64"):
            body = json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "arch": arch}
            ).encode()
            self.mirror.world.manifests[("library/multi", sha256(body))] = (OCI_MANIFEST, body)
            children.append({"mediaType": OCI_MANIFEST, "digest": sha256(body), "size": len(body)})
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
        ).encode()
        self.mirror.world.add_image("library/multi", "1", index, OCI_INDEX)
        self.assertEqual(
            self.mirror.body(self.mirror.request(b"GET", "/v2/multi/manifests/1", ACCEPT)), index
        )
        self.mirror.flush()
        self.mirror.world.faults = [503] * 10
        for child in children:
            response = self.mirror.request(b"GET", f"/v2/multi/manifests/{child['digest']}", ACCEPT)
            self.assertEqual(response.code, 200)
            self.assertEqual(header(response, b"cache-status"), "hammal; hit")


def _headers(raw: dict[bytes, list[bytes]]) -> Any:
    from twisted.web.http_headers import Headers

    return Headers(raw)

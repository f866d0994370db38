"""
Conditional requests are answered by hammal from the digest, and never go
out on upstream work that other clients share.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.conditional import etag, none_match, range_applies, without_conditionals
from tests.fakes import CDN, MANIFEST_V2, REGISTRY
from tests.test_v2 import Mirror, header

BLOB = bytes(range(256)) * 40
ACCEPT = [MANIFEST_V2.encode()]
CONDITIONALS = ("if-none-match", "if-range", "if-match", "if-modified-since")


class ConditionalHelperTests(SynchronousTestCase):
    DIGEST = "sha256:" + "ab" * 32

    def headers(self, **values: str) -> Headers:
        return Headers({k.replace("_", "-").encode(): [v.encode()] for k, v in values.items()})

    def test_etag_is_the_quoted_digest(self) -> None:
        self.assertEqual(etag(self.DIGEST), b'"' + self.DIGEST.encode() + b'"')

    def test_none_match(self) -> None:
        tag = f'"{self.DIGEST}"'
        self.assertTrue(none_match(self.headers(if_none_match=tag), self.DIGEST))
        self.assertTrue(none_match(self.headers(if_none_match=f'"x", W/{tag}'), self.DIGEST))
        self.assertTrue(none_match(self.headers(if_none_match="*"), self.DIGEST))
        self.assertFalse(none_match(self.headers(if_none_match='"sha256:00"'), self.DIGEST))
        self.assertFalse(none_match(self.headers(if_none_match=self.DIGEST), self.DIGEST))
        self.assertFalse(none_match(Headers(), self.DIGEST))

    def test_range_applies(self) -> None:
        self.assertTrue(range_applies(Headers(), self.DIGEST))
        self.assertTrue(range_applies(self.headers(if_range=f'"{self.DIGEST}"'), self.DIGEST))
        self.assertFalse(range_applies(self.headers(if_range=f'W/"{self.DIGEST}"'), self.DIGEST))
        self.assertFalse(
            range_applies(self.headers(if_range="Tue, 01 Dec 2026 00:00:00 GMT"), self.DIGEST)
        )

    def test_without_conditionals(self) -> None:
        headers = self.headers(if_none_match="*", if_range='"x"', accept="a", range="bytes=0-")
        stripped = without_conditionals(headers)
        self.assertEqual(
            sorted(name for name, _ in stripped.getAllRawHeaders()), [b"Accept", b"Range"]
        )
        self.assertTrue(headers.hasHeader(b"if-none-match"), "the original is left alone")


class ConditionalThroughCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = Mirror(cache_dir=self.mktemp(), retries=0)
        self.body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","v":1}'
        self.manifest_digest = self.mirror.world.add_image("library/alpine", "3.20", self.body)
        self.blob_digest = self.mirror.world.add_blob(BLOB)
        self.blob_path = f"/v2/alpine/blobs/{self.blob_digest}"

    def upstream_conditionals(self) -> list[str]:
        return [
            f"{seen.path}: {name}"
            for seen in self.mirror.world.seen
            if seen.host in (REGISTRY, CDN)
            for name in CONDITIONALS
            if seen.header(name) is not None
        ]

    def test_manifest_etag_and_304(self) -> None:
        """A manifest carries its digest as ETag; If-None-Match with it gets a 304."""
        tag = f'"{self.manifest_digest}"'
        for _ in range(2):  # cold, then from the cache
            response = self.mirror.request(
                b"GET",
                "/v2/alpine/manifests/3.20",
                {b"accept": ACCEPT, b"if-none-match": [tag.encode()]},
            )
            self.assertEqual(response.code, 304)
            self.assertEqual(header(response, b"etag"), tag)
            self.assertEqual(header(response, b"docker-content-digest"), self.manifest_digest)
            self.assertEqual(self.mirror.body(response), b"")
        response = self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", {b"accept": ACCEPT})
        self.assertEqual(response.code, 200)
        self.assertEqual(header(response, b"etag"), tag)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(self.upstream_conditionals(), [])

    def test_manifest_other_etag_gets_the_manifest(self) -> None:
        response = self.mirror.request(
            b"GET", "/v2/alpine/manifests/3.20", {b"accept": ACCEPT, b"if-none-match": [b'"old"']}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(self.upstream_conditionals(), [])

    def test_blob_fill_carries_no_conditionals(self) -> None:
        """
        A client's If-None-Match and If-Range do not go out on the shared
        fill; the client with the matching tag gets a 304, the fill goes on
        and serves the next client from the cache.
        """
        tag = f'"{self.blob_digest}"'.encode()
        first = self.mirror.request(b"GET", self.blob_path, {b"if-none-match": [tag]})
        self.assertEqual(first.code, 304)
        self.assertEqual(header(first, b"etag"), tag.decode())
        self.assertEqual(self.upstream_conditionals(), [])
        second = self.mirror.request(
            b"GET", self.blob_path, {b"range": [b"bytes=0-9"], b"if-range": [b'"other"']}
        )
        self.assertEqual(second.code, 200, "If-Range names other content: all of it")
        self.assertEqual(self.mirror.body(second), BLOB)
        third = self.mirror.request(
            b"GET", self.blob_path, {b"range": [b"bytes=0-9"], b"if-range": [tag]}
        )
        self.assertEqual(third.code, 206)
        self.assertEqual(self.mirror.body(third), BLOB[:10])
        self.assertEqual(header(third, b"etag"), tag.decode())
        self.assertEqual(self.upstream_conditionals(), [])
        self.assertEqual(len([s for s in self.mirror.world.hits(CDN) if s.method == "GET"]), 1)

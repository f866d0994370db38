"""
Tests for L{hammal.storage.manifests}: manifests by digest in the object
store (L{FakeS3} over L{StubTreq}), read back verified, in front of upstream.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from hammal import metrics
from hammal.cache.manifests import StoredManifest
from hammal.reference import Digest, Reference
from hammal.replies import Document
from hammal.storage.health import StoreHealth
from hammal.storage.manifests import SharedManifests, SharedManifestStore
from hammal.storage.objects import object_key
from hammal.storage.s3 import S3Credentials, S3Location, S3Store
from tests.cluster.fakes import FakeS3

BODY = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
DIGEST = Digest.of(BODY, "sha256")
MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = StoredManifest(DIGEST, MEDIA_TYPE, BODY)


class Broken(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(500)
        return b""


class SharedManifestsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.s3 = FakeS3("blobs")
        self.stub = StubTreq(self.s3)
        self.shared = self.make(self.stub)
        self.upstream: list[Reference] = []

    def make(self, stub: StubTreq) -> SharedManifests:
        store = S3Store(
            "http://s3.test",
            S3Location("blobs", "p/"),
            S3Credentials("AK", "secret"),
            stub,
            Clock(),
        )
        return SharedManifests(store, StoreHealth(self.clock))

    def done(self, d: Any, stub: StubTreq | None = None) -> Any:
        (stub or self.stub).flush()
        return self.successResultOf(d)

    async def fetch(
        self, name: str, reference: Reference, headers: Headers, trace: Any
    ) -> Document:
        self.upstream.append(reference)
        return Document(200, [(b"content-type", [b"upstream"])], b"from upstream")

    def test_written_then_read_through(self) -> None:
        """A stored manifest is served by digest without asking upstream."""
        self.done(self.shared.write(MANIFEST))
        self.assertEqual(
            self.s3.objects["p/" + object_key("manifests", str(DIGEST))],
            MEDIA_TYPE.encode() + b"\n" + BODY,
        )
        fresh = self.make(self.stub)  # another instance
        fetch = fresh.fetch_through(self.fetch)
        document = self.done(Deferred.fromCoroutine(fetch("a/b", DIGEST, Headers(), None)))
        self.assertEqual(document.body, BODY)
        self.assertIn((b"content-type", [MEDIA_TYPE.encode()]), document.headers)
        self.assertIn((b"docker-content-digest", [str(DIGEST).encode()]), document.headers)
        self.assertEqual(self.upstream, [])

    def test_tags_and_misses_go_upstream(self) -> None:
        """A tag, or a digest the store lacks, is upstream's to answer."""
        fetch = self.shared.fetch_through(self.fetch)
        document = self.done(Deferred.fromCoroutine(fetch("a/b", DIGEST, Headers(), None)))
        self.assertEqual(document.body, b"from upstream")
        self.done(Deferred.fromCoroutine(fetch("a/b", "latest", Headers(), None)))  # type: ignore[arg-type]
        self.assertEqual(self.upstream, [DIGEST, "latest"])

    def test_damaged_object_is_not_served(self) -> None:
        """An object whose bytes do not match its digest is ignored."""
        self.s3.objects["p/" + object_key("manifests", str(DIGEST))] = b"x\n" + BODY + b" "
        self.assertIsNone(self.done(Deferred.fromCoroutine(self.shared.read(DIGEST))))

    def test_store_down(self) -> None:
        """A failing store costs a metric and goes upstream; writes fail quietly."""
        broken = StubTreq(Broken())
        shared = self.make(broken)
        before = metrics.object_store_failures.labels("read")._value.get()
        self.assertIsNone(self.done(Deferred.fromCoroutine(shared.read(DIGEST)), broken))
        self.assertEqual(metrics.object_store_failures.labels("read")._value.get(), before + 1)
        # Left alone for a while after the failure, then asked again.
        self.assertIsNone(self.done(Deferred.fromCoroutine(shared.read(DIGEST)), broken))
        self.assertEqual(metrics.object_store_failures.labels("read")._value.get(), before + 1)
        self.clock.advance(5)
        self.assertIsNone(self.done(Deferred.fromCoroutine(shared.read(DIGEST)), broken))
        self.assertEqual(metrics.object_store_failures.labels("read")._value.get(), before + 2)
        self.assertIsNone(self.done(shared.write(MANIFEST), broken))

    def test_manifest_store_shares_what_it_keeps(self) -> None:
        """The local manifest store also puts each manifest in the object store."""
        store = SharedManifestStore(self.mktemp(), self.shared)
        store.open()
        store.put(MANIFEST)
        self.stub.flush()
        self.assertEqual(store.get(DIGEST), MANIFEST)
        self.assertIn("p/" + object_key("manifests", str(DIGEST)), self.s3.objects)

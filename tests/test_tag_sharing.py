"""
Tag entries shared between clients and processes: stale-if-error serves
every client a stored answer it accepts, and a revalidation answered before
a tag moved never writes the old digest over a newer entry.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.cache.manifests import DiskTagStore, ManifestCache, ManifestStore, TagEntry, tag_key
from hammal.reference import Digest
from hammal.replies import Document
from hammal.ttlstore import MemoryTtlStore, RedisTtlStore, ResilientTtlStore
from hammal.upstream.client import Trace
from tests.fakes import MANIFEST_V2, REGISTRY
from tests.test_ttlstore import FakeRedis
from tests.test_v2 import Mirror, header

LIST_V2 = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: podman sends six Accept headers; docker-style clients fewer.
PODMAN = {b"accept": [t.encode() for t in (OCI_INDEX, OCI_MANIFEST, LIST_V2, MANIFEST_V2)]}
DOCKER = {b"accept": [MANIFEST_V2.encode()]}


class StaleForEveryClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.mirror = Mirror(cache_dir=self.mktemp(), retries=0)
        self.body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","v":1}'
        self.digest = self.mirror.world.add_image("library/alpine", "3.20", self.body)

    def get(self, accept: Any) -> Any:
        return self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", accept)

    def test_docker_client_served_what_podman_pulled(self) -> None:
        """
        With upstream down, a client whose Accept set differs from the one
        that pulled the tag is served the stored manifest if it accepts its
        type, with the stale warning.
        """
        self.assertEqual(self.mirror.body(self.get(PODMAN)), self.body)
        self.mirror.clock.advance(301)
        self.mirror.world.faults = [503] * 10
        stale = self.get(DOCKER)
        self.assertEqual(stale.code, 200)
        self.assertEqual(header(stale, b"cache-status"), "hammal; fwd=stale; detail=stale-if-error")
        self.assertEqual(header(stale, b"docker-content-digest"), self.digest)
        self.assertEqual(header(stale, b"warning"), '110 - "Response is Stale"')
        self.assertEqual(self.mirror.body(stale), self.body)

    def test_not_a_type_the_client_accepts(self) -> None:
        """A client that does not accept the stored type gets upstream's error."""
        self.mirror.body(self.get(PODMAN))
        self.mirror.world.faults = [503] * 10
        oci_only = self.get({b"accept": [OCI_MANIFEST.encode()]})
        self.assertEqual(oci_only.code, 502)

    def test_too_stale_for_any_client(self) -> None:
        self.mirror.body(self.get(PODMAN))
        self.mirror.clock.advance(300 + 3600 + 1)
        self.mirror.world.faults = [503] * 10
        self.assertEqual(self.get(DOCKER).code, 502)

    def test_upstream_up_asks_upstream(self) -> None:
        """Only failures fall back: with upstream up, the docker client's own answer."""
        self.mirror.body(self.get(PODMAN))
        fresh = self.get(DOCKER)
        self.assertEqual(header(fresh, b"cache-status"), "hammal; fwd=miss")
        gets = [s for s in self.mirror.world.hits(REGISTRY, "/manifests/") if s.method == "GET"]
        self.assertEqual(len([g for g in gets if g.header("authorization")]), 2)


def _manifest(version: int) -> tuple[bytes, Digest]:
    body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","v":%d}' % version
    return body, Digest.of(body)


class RevalidationRaceTests(SynchronousTestCase):
    """
    Two processes sharing the cache directory: one revalidates with a HEAD
    that upstream answers before the tag moves; the other fetches the moved
    tag meanwhile. The old digest must not be written back over the new.
    """

    def setUp(self) -> None:
        root = self.mktemp()
        self.clock = Clock()
        self.tags = DiskTagStore(root, self.clock)
        self.tags.open()
        store = ManifestStore(root)
        store.open()
        self.heads: list[Deferred[str | None]] = []
        self.current = _manifest(1)

        async def fetch(name: str, reference: Any, headers: Headers, trace: Trace) -> Document:
            body, digest = self.current
            return Document(
                200,
                [
                    (b"content-type", [MANIFEST_V2.encode()]),
                    (b"docker-content-digest", [str(digest).encode()]),
                ],
                body,
            )

        async def head(name: str, tag: str, headers: Headers, trace: Trace) -> str | None:
            d: Deferred[str | None] = Deferred()
            self.heads.append(d)
            return await d

        def cache() -> ManifestCache:
            remote = SimpleNamespace(fetch=fetch, head_digest=head)
            return ManifestCache(store, self.tags, self.clock, "https://up.test", remote, ttl=300)

        self.first, self.second = cache(), cache()
        self.accepted = frozenset({MANIFEST_V2})
        self.key = tag_key("https://up.test", "library/a", "1", self.accepted)

    def get(self, cache: ManifestCache) -> Deferred[Document]:
        return Deferred.fromCoroutine(
            cache.get("library/a", "1", self.accepted, Headers(), Trace())
        )

    def stored_entry(self) -> TagEntry | None:
        return TagEntry.loads(self.successResultOf(self.tags.get(self.key)) or "")

    def test_old_head_answer_does_not_overwrite_a_newer_entry(self) -> None:
        _, old_digest = self.current
        self.successResultOf(self.get(self.first))
        self.clock.advance(301)
        revalidation = self.get(self.first)  # HEAD sent at t=301, answer pending
        self.assertEqual(len(self.heads), 1)
        self.clock.advance(1)
        self.current = _manifest(2)  # the tag moves upstream
        new_body, new_digest = self.current
        # the other process learns it (no entry of its own yet: a GET)
        self.tags.delete(self.key)
        self.second._recent_tags.clear()
        moved = self.successResultOf(self.get(self.second))
        self.assertEqual(moved.body, new_body)
        self.assertEqual(self.stored_entry().digest, str(new_digest))  # type: ignore[union-attr]
        self.clock.advance(1)
        self.heads[0].callback(str(old_digest))  # answered before the move
        self.successResultOf(revalidation)
        entry = self.stored_entry()
        assert entry is not None
        self.assertEqual(entry.digest, str(new_digest), "the old digest was written back")

    def test_revalidation_records_when_it_asked(self) -> None:
        """A revalidated entry is as old as the HEAD's question, not its answer."""
        _, digest = self.current
        self.successResultOf(self.get(self.first))
        self.clock.advance(301)
        revalidation = self.get(self.first)
        self.clock.advance(5)
        self.heads[0].callback(str(digest))
        self.successResultOf(revalidation)
        entry = self.stored_entry()
        assert entry is not None
        self.assertEqual(entry.checked_at, 301)


class GetLatestTests(SynchronousTestCase):
    """L{ResilientTtlStore.get_latest}: the shared value first, for compare-before-write."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedis(self.clock)
        self.shared = RedisTtlStore(self.redis, self.clock)
        self.local = MemoryTtlStore(self.clock)
        self.cache = ResilientTtlStore(self.shared, self.local, self.clock)
        self.patch(
            ResilientTtlStore, "log", Logger(observer=cast(ILogObserver, lambda event: None))
        )

    def test_shared_value_wins(self) -> None:
        self.local.set("k", "old", 60)
        self.shared.set("k", "new", 60)  # another instance wrote it
        self.assertEqual(self.successResultOf(self.cache.get("k")), "old")
        self.assertEqual(self.successResultOf(self.cache.get_latest("k")), "new")

    def test_local_when_shared_has_none_or_fails(self) -> None:
        self.local.set("k", "local", 60)
        self.assertEqual(self.successResultOf(self.cache.get_latest("k")), "local")
        self.redis.down = True
        self.assertEqual(self.successResultOf(self.cache.get_latest("k")), "local")

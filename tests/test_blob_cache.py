"""
Tests for the pull-through blob cache through the ``/v2/`` resource, in
memory: hits, coalescing, verification, resume, ranges and eviction.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal.cache.blobs import BlobCache
from hammal.cache.store import BlobStore
from hammal.reference import Digest
from hammal.replies import CACHE_HIT
from tests.fakes import CDN
from tests.test_v2 import Mirror, header

BLOB = bytes(range(256)) * 40  # 10240 bytes, 11 chunks of 1000 in the cache


class BlobCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = self.mktemp()
        self.mirror = Mirror(cache_dir=self.cache_dir)
        self.digest = self.mirror.world.add_blob(BLOB)
        self.path = f"/v2/alpine/blobs/{self.digest}"

    def get(self, path: str | None = None, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        return self.mirror.request(b"GET", path or self.path, headers)

    def cdn_gets(self) -> int:
        return len([s for s in self.mirror.world.hits(CDN) if s.method == "GET"])

    def stored(self) -> str:
        return os.path.join(self.cache_dir, "blobs", "sha256", self.digest[7:9], self.digest[7:])

    def test_miss_then_hit(self) -> None:
        """The first GET fills the cache; the second needs no upstream at all."""
        first = self.get()
        self.assertEqual(header(first, b"cache-status"), "hammal; fwd=miss")
        self.assertEqual(self.mirror.body(first), BLOB)
        with open(self.stored(), "rb") as stored:
            self.assertEqual(stored.read(), BLOB)
        upstream_before = len(self.mirror.world.seen)
        second = self.get()
        self.assertEqual(header(second, b"cache-status"), "hammal; hit")
        self.assertEqual(second.length, len(BLOB))
        self.assertEqual(header(second, b"docker-content-digest"), self.digest)
        self.assertEqual(self.mirror.body(second), BLOB)
        head = self.mirror.request(b"HEAD", self.path)
        self.assertEqual(header(head, b"content-length"), str(len(BLOB)))
        self.assertEqual(len(self.mirror.world.seen), upstream_before)

    def test_one_copy_across_repositories(self) -> None:
        """A blob cached through one repository is a hit through another."""
        self.mirror.body(self.get())
        other = self.get(f"/v2/bitnami/redis/blobs/{self.digest}")
        self.assertEqual(header(other, b"cache-status"), "hammal; hit")
        self.assertEqual(self.cdn_gets(), 1)

    def test_concurrent_cold_clients_coalesce(self) -> None:
        """20 concurrent cold GETs make one upstream fetch; all get every byte."""
        self.mirror.world.hold_blobs = True
        pending = [
            self.mirror.agent.request(b"GET", f"http://mirror.test{self.path}".encode())
            for _ in range(20)
        ]
        self.mirror.flush()
        responses = [self.successResultOf(d) for d in pending]
        statuses = sorted(header(r, b"cache-status") or "" for r in responses)
        self.assertEqual(statuses.count("hammal; fwd=miss"), 1)
        self.assertEqual(statuses.count("hammal; fwd=miss; collapsed; detail=coalesced"), 19)
        self.mirror.world.release()
        for response in responses:
            self.assertEqual(self.mirror.body(response), BLOB)
        self.assertEqual(self.cdn_gets(), 1)

    def test_fetch_completes_when_clients_leave(self) -> None:
        """A client leaving mid-transfer does not stop the cache fill."""
        self.mirror.world.hold_blobs = True
        response = self.get()
        self.assertEqual(response.code, 200)
        self.mirror.agent.flush()
        response._transport.stopProducing()  # the client hangs up
        self.mirror.flush()
        self.mirror.world.release()
        self.mirror.flush()
        self.assertTrue(os.path.exists(self.stored()))
        self.assertEqual(header(self.get(), b"cache-status"), "hammal; hit")

    def test_corrupt_upstream_never_cached(self) -> None:
        """A digest mismatch aborts the client and leaves nothing in the cache."""
        self.mirror.world.corrupt_blobs = True
        response = self.get()
        result = self.mirror.body(response)
        if response.code == 200:
            self.assertIsInstance(result, Failure, "a corrupt blob arrived complete")
        else:
            self.assertEqual(response.code, 502)
        self.assertFalse(os.path.exists(self.stored()))
        self.assertEqual(os.listdir(os.path.join(self.cache_dir, "tmp")), [])
        self.mirror.world.corrupt_blobs = False
        retry = self.get()
        self.assertEqual(header(retry, b"cache-status"), "hammal; fwd=miss")
        self.assertEqual(self.mirror.body(retry), BLOB)

    def test_corrupt_midstream_aborts_started_response(self) -> None:
        """Clients already streaming a corrupt transfer are aborted, never finished."""
        self.mirror.world.corrupt_blobs = True
        self.mirror.world.hold_blobs = True
        responses = [self.get(), self.get()]
        for response in responses:
            self.assertEqual(response.code, 200)
        self.mirror.world.release()
        for response in responses:
            result = self.mirror.body(response)
            self.assertIsInstance(result, Failure, "a corrupt blob arrived complete")
        self.assertFalse(os.path.exists(self.stored()))

    def test_resume_after_reset(self) -> None:
        """An upstream reset mid-blob is resumed with Range; the client sees one stream."""
        self.mirror.world.reset_after = [3000]
        response = self.get()
        self.assertEqual(self.mirror.body(response), BLOB)
        ranges = [s.header("range") for s in self.mirror.world.hits(CDN)]
        self.assertEqual(ranges, [None, "bytes=3000-"])
        self.assertTrue(os.path.exists(self.stored()))

    def test_resume_when_range_ignored(self) -> None:
        """A CDN that ignores Range sends everything again; the prefix is skipped."""
        self.mirror.world.reset_after = [3000]
        self.mirror.world.honour_range = False
        self.assertEqual(self.mirror.body(self.get()), BLOB)

    def test_resume_gives_up(self) -> None:
        """Past the resume budget the client's transfer is aborted, nothing cached."""
        self.mirror.world.reset_after = [1000, 1000, 1000, 1000]
        response = self.get()
        result = self.mirror.body(response)
        if response.code == 200:
            self.assertIsInstance(result, Failure, "a broken blob arrived complete")
        else:
            self.assertEqual(response.code, 502)
        self.assertFalse(os.path.exists(self.stored()))

    def test_range_from_cache(self) -> None:
        """A Range on a cached blob gets a 206 with the right bytes."""
        self.mirror.body(self.get())
        response = self.get(headers={b"range": [b"bytes=100-199"]})
        self.assertEqual(response.code, 206)
        self.assertEqual(header(response, b"content-range"), f"bytes 100-199/{len(BLOB)}")
        self.assertEqual(self.mirror.body(response), BLOB[100:200])
        suffix = self.get(headers={b"range": [b"bytes=-10"]})
        self.assertEqual(self.mirror.body(suffix), BLOB[-10:])

    def test_range_during_transfer(self) -> None:
        """A Range while the blob is still arriving is served from the growing file."""
        self.mirror.world.hold_blobs = True
        first = self.get()
        ranged = self.get(headers={b"range": [b"bytes=9000-"]})
        self.assertEqual(ranged.code, 206)
        self.assertEqual(
            header(ranged, b"cache-status"), "hammal; fwd=miss; collapsed; detail=coalesced"
        )
        self.mirror.world.release()
        self.assertEqual(self.mirror.body(ranged), BLOB[9000:])
        self.assertEqual(self.mirror.body(first), BLOB)

    def test_unsatisfiable_range(self) -> None:
        self.mirror.body(self.get())
        response = self.get(headers={b"range": [b"bytes=99999-"]})
        self.assertEqual(response.code, 416)
        self.assertEqual(header(response, b"content-range"), f"bytes */{len(BLOB)}")

    def test_html_page_rejected(self) -> None:
        """A 200 HTML page in place of a blob is a 502, not a stream."""
        self.mirror.world.blob_content_type = b"text/html; charset=utf-8"
        response = self.get()
        self.assertEqual(response.code, 502)
        self.assertFalse(os.path.exists(self.stored()))
        uncached = Mirror()
        uncached.world.blob_content_type = b"text/html"
        digest = uncached.world.add_blob(BLOB)
        self.assertEqual(uncached.request(b"GET", f"/v2/alpine/blobs/{digest}").code, 502)

    def test_upstream_404_not_cached(self) -> None:
        missing = "sha256:" + "f" * 64
        response = self.get(f"/v2/alpine/blobs/{missing}")
        self.assertEqual(response.code, 404)
        self.assertEqual(os.listdir(os.path.join(self.cache_dir, "tmp")), [])


class BlobStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()

    def put(self, store: BlobStore, data: bytes) -> Digest:
        digest = Digest.of(data)
        temporary = store.temporary_path(digest)
        with open(temporary, "wb") as f:
            f.write(data)
        store.commit(temporary, digest)
        return digest

    def test_eviction_by_last_access(self) -> None:
        """Past max_size the least recently used blob goes, not the oldest fetched."""
        store = BlobStore(self.root, max_size=250)
        store.open()
        a = self.put(store, b"a" * 100)
        b = self.put(store, b"b" * 100)
        store.touch(a)
        c = self.put(store, b"c" * 100)
        self.assertIn(a, store)
        self.assertIn(c, store)
        self.assertNotIn(b, store)
        self.assertEqual(store.evictions, 1)

    def test_pinned_not_evicted(self) -> None:
        store = BlobStore(self.root, max_size=150)
        store.open()
        a = self.put(store, b"a" * 100)
        store.pin(a)
        b = self.put(store, b"b" * 100)
        self.assertIn(a, store)
        self.assertNotIn(b, store)

    def test_restart_rebuilds_index(self) -> None:
        """A new store on the same directory knows every blob, and cleans old temporaries."""
        store = BlobStore(self.root)
        store.open()
        a = self.put(store, b"x" * 10)
        stale = os.path.join(self.root, "tmp", "dead.1.abc")
        with open(stale, "wb") as f:
            f.write(b"half")
        os.utime(stale, (0, 0))
        fresh = os.path.join(self.root, "tmp", "live.2.def")
        with open(fresh, "wb") as f:
            f.write(b"busy")
        again = BlobStore(self.root)
        again.open()
        self.assertEqual(again.size(a), 10)
        self.assertEqual(again.total_size, 10)
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(fresh))

    def test_shared_directory(self) -> None:
        """A blob another process committed is found on lookup."""
        one, two = BlobStore(self.root), BlobStore(self.root)
        one.open()
        two.open()
        digest = self.put(one, b"shared")
        self.assertEqual(two.size(digest), 6)


class ServePolicyTests(SynchronousTestCase):
    """L{BlobCache.serve} decides hit, range and fill by itself."""

    def setUp(self) -> None:
        self.store = BlobStore(self.mktemp())
        self.store.open()
        self.cache = BlobCache(self.store, Clock(), read_timeout=10, resumes=0)
        self.blob = b"0123456789" * 10
        self.digest = Digest.of(self.blob)
        temporary = self.store.temporary_path(self.digest)
        with open(temporary, "wb") as f:
            f.write(self.blob)
        self.store.commit(temporary, self.digest)
        self.started: list[int] = []

    def start(self, offset: int, end: int | None = None) -> Any:
        self.started.append(offset)
        raise AssertionError("a hit must not go upstream")

    def serve(self, method: bytes, headers: dict[bytes, list[bytes]]) -> Any:
        work = Deferred.fromCoroutine(
            self.cache.serve(
                method, self.digest, Headers(headers), self.start, "up.test", "library/a"
            )
        )
        return self.successResultOf(work)

    def test_hit_range(self) -> None:
        """A Range on a hit is answered from disk: 206 and its Content-Range."""
        reply = self.serve(b"GET", {b"range": [b"bytes=10-19"]})
        self.assertEqual((reply.status, reply.length, reply.cache_status), (206, 10, CACHE_HIT))
        self.assertIn((b"content-range", [b"bytes 10-19/100"]), reply.headers)
        reply.body.stop()
        self.assertEqual(self.started, [])

    def test_if_range_elsewhere(self) -> None:
        """An If-Range naming other content: the whole blob, 200."""
        reply = self.serve(b"HEAD", {b"range": [b"bytes=10-19"], b"if-range": [b'"sha256:other"']})
        self.assertEqual((reply.status, reply.length, reply.body), (200, 100, None))

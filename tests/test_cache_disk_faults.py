"""
A cache disk that fails (full, read-only, broken) only means "not cached":
clients are served from upstream, every failure is counted and the log gets
at most one warning a minute. In memory, with faults made by breaking the
cache directory itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hammal import metrics
from hammal.cache.store import BlobStore, FreeSpaceFloor
from hammal.cache.sweep import CacheSweep
from hammal.cache.writes import WriteErrors
from hammal.reference import Digest
from tests.fakes import MANIFEST_V2
from tests.test_v2 import Mirror, header

ACCEPT = {b"accept": [MANIFEST_V2.encode()]}


def write_errors(kind: str) -> float:
    """The current value of C{hammal_cache_write_errors_total{kind=...}}."""
    value = metrics.REGISTRY.get_sample_value("hammal_cache_write_errors_total", {"kind": kind})
    return value or 0.0


def replace_with_file(path: str) -> None:
    """Make C{path} a regular file: every write below it fails (ENOTDIR)."""
    shutil.rmtree(path)
    with open(path, "w") as blocker:
        blocker.write("not a directory")


class ManifestWriteFailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache_dir = self.mktemp()
        self.mirror = Mirror(cache_dir=self.cache_dir, retries=0)
        self.body = b'{"schemaVersion":2,"mediaType":"' + MANIFEST_V2.encode() + b'","v":1}'
        self.digest = self.mirror.world.add_image("library/alpine", "3.20", self.body)

    def test_tag_store_failure_serves_the_manifest(self) -> None:
        """
        The tag store refusing writes costs the cache, not the pull: the
        manifest fetched by tag is answered 200, the failure counted.
        """
        replace_with_file(os.path.join(self.cache_dir, "tags"))
        before = write_errors("tag")
        response = self.mirror.request(b"GET", "/v2/alpine/manifests/3.20", ACCEPT)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(header(response, b"docker-content-digest"), self.digest)
        self.assertEqual(write_errors("tag"), before + 1)
        self.assertEqual(os.listdir(os.path.join(self.cache_dir, "tmp")), [])

    def test_manifest_store_failure_serves_the_manifest(self) -> None:
        """Manifests that cannot be stored are served, and leave no temporaries."""
        replace_with_file(os.path.join(self.cache_dir, "manifests"))
        before = write_errors("manifest")
        response = self.mirror.request(b"GET", f"/v2/alpine/manifests/{self.digest}", ACCEPT)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), self.body)
        self.assertEqual(write_errors("manifest"), before + 1)
        self.assertEqual(os.listdir(os.path.join(self.cache_dir, "tmp")), [])

    def test_full_tmp_serves_the_manifest(self) -> None:
        """No room for temporaries at all: still 200 by tag and by digest."""
        replace_with_file(os.path.join(self.cache_dir, "tmp"))
        for reference in ("3.20", self.digest):
            response = self.mirror.request(b"GET", f"/v2/alpine/manifests/{reference}", ACCEPT)
            self.assertEqual(response.code, 200)
            self.assertEqual(self.mirror.body(response), self.body)


class WriteErrorsTests(SynchronousTestCase):
    def test_one_warning_per_minute(self) -> None:
        """A full disk fails every write; the log hears of it once a minute."""
        clock = Clock()
        events: list[dict[str, Any]] = []
        errors = WriteErrors(clock)
        errors.log = Logger(observer=events.append)
        before = write_errors("blob")
        for _ in range(5):
            errors.record("blob", "sha256:ab", "No space left on device")
            clock.advance(10)
        self.assertEqual(len(events), 1)
        self.assertEqual(write_errors("blob"), before + 5)
        clock.advance(20)
        errors.record("blob", "sha256:ab", "No space left on device")
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["unsaid"], 4)


BLOB = bytes(range(256)) * 40  # 10240 bytes


class BlobWriteFailureTests(SynchronousTestCase):
    """
    Blob fills whose disk fails: clients always get upstream's exact bytes
    (never a 5xx), the cache keeps nothing partial, temporaries go at once.
    """

    def setUp(self) -> None:
        self.cache_dir = self.mktemp()
        self.mirror = Mirror(cache_dir=self.cache_dir)
        assert self.mirror.blobs is not None
        self.blobs = self.mirror.blobs
        self.store = self.blobs.store
        self.digest = self.mirror.world.add_blob(BLOB)
        self.path = f"/v2/alpine/blobs/{self.digest}"

    def get(self, headers: dict[bytes, list[bytes]] | None = None, path: str | None = None) -> Any:
        return self.mirror.request(b"GET", path or self.path, headers)

    def start(self, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        """A GET whose response is returned as soon as its headers are in."""
        d = self.mirror.agent.request(
            b"GET", f"http://mirror.test{self.path}".encode(), Headers(headers or {})
        )
        self.mirror.flush()
        return self.successResultOf(d)

    def tmp(self) -> list[str]:
        return os.listdir(os.path.join(self.cache_dir, "tmp"))

    def stored(self) -> bool:
        return os.path.exists(
            os.path.join(self.cache_dir, "blobs", "sha256", self.digest[7:9], self.digest[7:])
        )

    def assertNoPaths(self, response: Any, body: Any) -> None:
        text = body if isinstance(body, bytes) else str(body).encode()
        self.assertNotIn(self.cache_dir.encode(), text)
        for _, values in response.headers.getAllRawHeaders():
            for value in values:
                self.assertNotIn(self.cache_dir.encode(), value)

    def test_temporary_file_cannot_be_created(self) -> None:
        """
        A cache that cannot create its temporary file serves the blob from
        upstream, exact, with no cache path anywhere in the answer.
        """
        replace_with_file(os.path.join(self.cache_dir, "tmp"))
        before = write_errors("blob")
        response = self.get()
        body = self.mirror.body(response)
        self.assertNoPaths(response, body)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, BLOB)
        self.assertFalse(self.stored())
        self.assertEqual(write_errors("blob"), before + 1)

    def test_disk_fills_during_fill_with_ranged_followers(self) -> None:
        """
        A short write then ENOSPC in the middle of a fill: the file is never
        misaligned, followers (whole and ranged) get exactly upstream's
        bytes, nothing is cached, no upstream resume is blamed, the
        temporary is gone.
        """
        self.mirror.world.hold_blobs = True
        whole = self.start()
        ranged = self.start({b"range": [b"bytes=6000-8999"]})
        early = self.start({b"range": [b"bytes=100-2099"]})
        self.assertEqual((whole.code, ranged.code, early.code), (200, 206, 206))
        real_pwrite = os.pwrite
        calls: list[int] = []

        def filling_pwrite(fd: int, data: Any, offset: int) -> int:
            calls.append(offset)
            if len(calls) == 1:
                return real_pwrite(fd, bytes(data)[:100], offset)  # a short write
            raise OSError(28, "No space left on device")

        self.patch(os, "pwrite", filling_pwrite)
        cdn_before = self.cdn_gets()
        self.mirror.world.hold_blobs = False
        self.mirror.world.release()
        self.mirror.flush()
        self.assertEqual(self.mirror.body(whole), BLOB)
        self.assertEqual(self.mirror.body(ranged), BLOB[6000:9000])
        self.assertEqual(self.mirror.body(early), BLOB[100:2100])
        self.assertFalse(self.stored())
        self.assertEqual(self.tmp(), [])
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))
        # One request per follower that had to go on from upstream, none
        # to "resume" the broken fill.
        self.assertLessEqual(self.cdn_gets() - cdn_before, 3)
        self.assertEqual(len(calls), 2)

    def cdn_gets(self) -> int:
        from tests.fakes import CDN

        return len([s for s in self.mirror.world.hits(CDN) if s.method == "GET"])

    def test_failed_commit_unlinks_the_temporary(self) -> None:
        """
        fdatasync or rename failing: the client still gets the verified
        blob, the temporary goes at once, the next request is a miss (not a
        hit on a file that is not there).
        """
        replace_with_file(os.path.join(self.cache_dir, "blobs"))
        before = write_errors("blob")
        response = self.get()
        self.assertEqual(self.mirror.body(response), BLOB)
        self.assertEqual(self.tmp(), [])
        self.assertEqual(write_errors("blob"), before + 1)
        again = self.get()
        self.assertEqual(again.code, 200)
        self.assertEqual(self.mirror.body(again), BLOB)
        self.assertEqual(header(again, b"cache-status"), "hammal; fwd=miss")

    def test_hash_failure_fails_the_fill_once(self) -> None:
        """
        Hashing a batch fails part-way (after the writer wrote it): the
        fill fails locally (the hasher is not fed twice, so no false digest
        mismatch), and the client gets the blob from upstream.
        """
        from hammal.cache import fetch as fetch_module

        failed: list[bool] = []

        def flaky(f: Any, *args: Any) -> Any:
            if f is fetch_module._write_and_hash and not failed:
                failed.append(True)
                fd, offset, chunks, hasher = args
                fetch_module._write_chunks(fd, offset, chunks)
                hasher.update(chunks[0][: len(chunks[0]) // 2])
                return fail(OSError(5, "Input/output error"))
            return succeed(f(*args))

        self.blobs._offload = flaky
        mismatches = metrics.REGISTRY.get_sample_value("hammal_digest_mismatches_total") or 0
        response = self.get()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), BLOB)
        self.assertEqual(failed, [True])
        self.assertEqual(
            metrics.REGISTRY.get_sample_value("hammal_digest_mismatches_total") or 0, mismatches
        )
        self.assertEqual(self.tmp(), [])

    def test_failing_pread_ends_cleanly(self) -> None:
        """
        A cached blob that cannot be read (EIO) is served from upstream; the
        reader's pin is released.
        """
        self.assertEqual(self.mirror.body(self.get()), BLOB)
        self.assertTrue(self.stored())

        def broken_pread(fd: int, size: int, offset: int) -> bytes:
            raise OSError(5, "Input/output error")

        self.patch(os, "pread", broken_pread)
        response = self.get()
        self.assertEqual(header(response, b"cache-status"), "hammal; hit")
        self.assertEqual(self.mirror.body(response), BLOB)
        self.assertEqual(self.store._pins, {})
        self.assertEqual(self.blobs.readers, 0)

    def test_bypass_verifies_a_whole_blob(self) -> None:
        """
        A whole blob fetched around a failing cache is checked against its
        digest: corrupt bytes from upstream never arrive complete.
        """
        self.assertEqual(self.mirror.body(self.get()), BLOB)

        def broken_pread(fd: int, size: int, offset: int) -> bytes:
            raise OSError(5, "Input/output error")

        self.patch(os, "pread", broken_pread)
        self.mirror.world.corrupt_blobs = True
        response = self.get()
        self.assertEqual(response.code, 200)
        self.assertIsInstance(self.mirror.body(response), Failure)

    def test_cached_file_gone_before_reading(self) -> None:
        """A blob removed behind the server's back (gc) is served from upstream."""
        self.assertEqual(self.mirror.body(self.get()), BLOB)
        stored = os.path.join(self.cache_dir, "blobs", "sha256", self.digest[7:9], self.digest[7:])
        # `hammal cache gc` removes it just after the server found it.
        self.patch(self.store, "touch", lambda digest: os.unlink(stored))
        response = self.get({b"range": [b"bytes=10-19"]})
        self.assertEqual(response.code, 206)
        self.assertEqual(self.mirror.body(response), BLOB[10:20])

    def test_disk_full_serves_uncached(self) -> None:
        """Below the free-space floor nothing is written; pulls are exact."""
        self.store.min_free = FreeSpaceFloor(size=1 << 62)
        before = write_errors("blob")
        response = self.get()
        self.assertEqual(response.code, 200)
        self.assertEqual(self.mirror.body(response), BLOB)
        self.assertFalse(self.stored())
        self.assertEqual(self.tmp(), [])
        self.assertEqual(write_errors("blob"), before + 1)

    def test_floor_checked_during_the_fill(self) -> None:
        """The free-space floor reached mid-fill ends caching, not the pull."""
        from hammal.cache import fetch as fetch_module

        self.patch(fetch_module, "CHECK_FREE_EVERY", 1000)
        self.mirror.world.hold_blobs = True
        whole = self.start()
        self.store.min_free = FreeSpaceFloor(size=1 << 62)
        self.mirror.world.hold_blobs = False
        self.mirror.world.release()
        self.assertEqual(self.mirror.body(whole), BLOB)
        self.assertFalse(self.stored())
        self.assertEqual(self.tmp(), [])


class CacheBoundTests(SynchronousTestCase):
    """--cache-max-size bounds what is stored and in flight."""

    def setUp(self) -> None:
        self.cache_dir = self.mktemp()
        self.mirror = Mirror(cache_dir=self.cache_dir)
        assert self.mirror.blobs is not None
        self.store = self.mirror.blobs.store
        self.small = [self.mirror.world.add_blob(bytes([n]) * 3000) for n in range(2)]
        self.large = self.mirror.world.add_blob(bytes(range(256)) * 40)
        self.store.max_size = 8000

    def get(self, digest: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        response = self.mirror.request(b"GET", f"/v2/alpine/blobs/{digest}", headers)
        return response, self.mirror.body(response)

    def cdn_gets(self, digest: str) -> list[Any]:
        from tests.fakes import CDN

        return [s for s in self.mirror.world.hits(CDN, digest) if s.method == "GET"]

    def test_range_of_a_blob_over_the_cap(self) -> None:
        """A range of a blob the cache refuses comes from upstream, exact."""
        response, body = self.get(self.large, {b"range": [b"bytes=100-"]})
        self.assertEqual(response.code, 206)
        self.assertEqual(body, self.mirror.world.blobs[self.large][100:])
        self.assertNotIn(Digest.parse(self.large), self.store)

    def test_blob_larger_than_the_cap_streams_through(self) -> None:
        """A blob over --cache-max-size is not stored and evicts nothing."""
        for digest in self.small:
            self.get(digest)
        self.assertEqual(len(self.store), 2)
        response, body = self.get(self.large)
        self.assertEqual(response.code, 200)
        self.assertEqual(body, self.mirror.world.blobs[self.large])
        # the refused fetch's own answer was relayed: one upstream GET, not two
        self.assertEqual(len(self.cdn_gets(self.large)), 1)
        self.assertEqual(len(self.store), 2)
        self.assertEqual(self.store.evictions, 0)
        self.assertNotIn(Digest.parse(self.large), self.store)

    def test_in_flight_bytes_count(self) -> None:
        """
        A fill in flight holds its room: a second blob that fits only
        without it streams through uncached, and the first is stored.
        """
        held = self.mirror.world.add_blob(bytes([7]) * 6000)
        self.mirror.world.hold_blobs = True
        d = self.mirror.agent.request(b"GET", f"http://mirror.test/v2/alpine/blobs/{held}".encode())
        self.mirror.flush()
        first = self.successResultOf(d)
        self.assertEqual(self.store.reserved, 6000)
        self.mirror.world.hold_blobs = False
        response, body = self.get(self.small[0])  # 3000 more would exceed 8000
        self.assertEqual(body, self.mirror.world.blobs[self.small[0]])
        self.assertEqual(header(response, b"cache-status"), "hammal; fwd=bypass")
        self.mirror.world.release()
        self.assertEqual(self.mirror.body(first), self.mirror.world.blobs[held])
        self.assertIn(Digest.parse(held), self.store)
        self.assertNotIn(Digest.parse(self.small[0]), self.store)
        self.assertEqual((self.store.reserved, self.store.reserved_written), (0, 0))

    def test_evicts_only_when_the_newcomer_fits(self) -> None:
        """Room is made by eviction when, and only when, the newcomer then fits."""
        for digest in self.small:
            self.get(digest)
        self.store.reserved = 1500  # another transfer in flight
        self.assertFalse(self.store.reserve(6600))
        self.assertEqual(self.store.evictions, 0)
        self.assertTrue(self.store.reserve(3000))
        self.assertEqual(self.store.evictions, 1)
        self.assertEqual(self.store.total_size + self.store.reserved, 7500)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


class TemporaryReclaimTests(SynchronousTestCase):
    """What a kill -9 leaves in tmp/ goes at once, and by a periodic sweep."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = BlobStore(self.root)
        self.store.open()
        self.tmp = os.path.join(self.root, "tmp")

    def leave(self, name: str) -> str:
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as out:
            out.write(b"partial")
        return path

    def test_dead_writers_reclaimed_at_start(self) -> None:
        """Blob, manifest and tag temporaries of a dead process go at the next start."""
        pid = dead_pid()
        for name in (f"{'ab' * 32}.{pid}.0011", f"m.{pid}.00aa", f"t.{pid}.00bb"):
            self.leave(name)
        live = self.leave(f"{'cd' * 32}.1.0022")  # pid 1 is alive: a transfer in progress
        BlobStore(self.root).open()
        self.assertEqual(os.listdir(self.tmp), [os.path.basename(live)])

    def test_legacy_tag_temporaries(self) -> None:
        """Tag temporaries older versions left beside the entries are reclaimed too."""
        folder = os.path.join(self.root, "tags", "ab")
        os.makedirs(folder)
        entry = os.path.join(folder, "ab" * 32)
        leftover = f"{entry}.{dead_pid()}.0a0b"
        for path in (entry, leftover):
            with open(path, "w") as out:
                out.write("1e12\n{}")
        self.store.sweep()
        self.assertEqual(os.listdir(folder), ["ab" * 32])

    def test_previous_process_with_our_pid(self) -> None:
        """A restarted container gets the same pid: what predates our start is not ours."""
        path = self.leave(f"{'ab' * 32}.{os.getpid()}.0011")
        os.utime(path, (time.time() - 5, time.time() - 5))
        store = BlobStore(self.root)
        store.open()
        self.assertFalse(os.path.exists(path))
        current = self.leave(f"{'ab' * 32}.{os.getpid()}.0012")
        store.sweep()
        self.assertTrue(os.path.exists(current))

    def test_periodic_sweep(self) -> None:
        """A running server reclaims a dead writer's temporary within a sweep interval."""
        clock = Clock()
        offloaded: list[Any] = []

        def offload(f: Any, *args: Any) -> Any:
            offloaded.append(f)
            return succeed(f(*args))

        sweep = CacheSweep(self.store, clock, interval=60, offload=offload)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        path = self.leave(f"{'ab' * 32}.{dead_pid()}.0011")
        clock.advance(59)
        self.assertTrue(os.path.exists(path))
        clock.advance(1)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(offloaded, [self.store.survey])  # the walk, off the event loop

    def test_sweep_survives_errors(self) -> None:
        """A failing sweep is logged; the next one still runs."""
        clock = Clock()
        calls: list[int] = []

        def survey(digests: list[str]) -> Any:
            calls.append(1)
            raise OSError(5, "Input/output error")

        self.patch(self.store, "survey", survey)
        service = CacheSweep(self.store, clock, interval=60)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(60)
        clock.advance(60)
        self.assertEqual(len(calls), 2)
        self.flushLoggedErrors(OSError)


class FreeSpaceTests(SynchronousTestCase):
    """Transfers in flight hold the free space they will still write."""

    def test_concurrent_reservations(self) -> None:
        store = BlobStore(self.mktemp(), min_free=FreeSpaceFloor(size=1000))
        store.open()
        free = [11000]
        self.patch(store, "free_space", lambda: free[0])
        self.assertTrue(store.reserve(6000))
        # 6000 still to come: 4000 more would cut into the floor
        self.assertFalse(store.reserve(4500))
        self.assertTrue(store.has_room(3000))
        self.assertFalse(store.has_room(4500))
        store.wrote(6000)
        free[0] = 5000
        self.assertTrue(store.has_room(4000))
        self.assertTrue(store.reserve(4000))
        store.unreserve(6000, 6000)
        self.assertEqual((store.reserved, store.unwritten()), (4000, 4000))


class SweepBoundTests(SynchronousTestCase):
    def test_sweep_restores_the_floor(self) -> None:
        """Something else filled the disk: the sweep evicts least recently used blobs."""
        root = self.mktemp()
        store = BlobStore(root)
        store.open()
        for number in range(3):
            data = bytes([number]) * 4096
            digest = Digest.of(data)
            temporary = store.temporary_path(digest)
            with open(temporary, "wb") as out:
                out.write(data)
            store.commit(temporary, digest)
            os.utime(store.path(digest), (1000 + number, 1000 + number))
        free = store.free_space()
        assert free is not None
        # The floor now sits 5000 bytes above what is free (give or take
        # what the rest of the machine writes meanwhile: a few pages).
        store.min_free = FreeSpaceFloor(size=free + 5000)
        self.patch(store, "free_space", lambda: free)
        store.sweep()
        self.assertEqual(store.evictions, 2)
        self.assertIn(Digest.of(bytes([2]) * 4096), store)


class ReadinessTests(SynchronousTestCase):
    def test_unwritable_cache_is_not_unready(self) -> None:
        """A full or read-only cache disk is reported by /readyz, which still answers 200."""
        mirror = Mirror()

        async def disk_full() -> str | None:
            return "cache directory not writable: No space left on device"

        mirror.readiness.add("cache", disk_full, required=False)
        response = mirror.request(b"GET", "/readyz")
        self.assertEqual(response.code, 200)
        report = json.loads(mirror.body(response))
        self.assertTrue(report["ready"])
        self.assertIn("No space left", report["checks"]["cache"])

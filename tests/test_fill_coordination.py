"""
One fill per digest among the processes sharing a cache directory: the
lock-file coordinator (also across real processes, with C{os.fork}), the
follower of another process's fill, and two apps sharing one directory.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.coordinate import FillHolder, LockFileCoordinator
from hammal.cache.readers import BlobReader
from hammal.cache.sibling import SiblingFill
from hammal.cache.store import BlobStore
from hammal.cache.writes import LocalCacheError
from hammal.errors import UpstreamTimeout
from hammal.reference import Digest
from tests.fakes import CDN, FakeConsumer, FakeUpstream, sha256
from tests.test_v2 import Mirror, header

BLOB = bytes(range(256)) * 40
DIGEST = Digest.parse(sha256(BLOB))


class LockFileCoordinatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        self.coordinator = LockFileCoordinator(self.root)
        self.coordinator.open()
        # Another process's view: locks are per open file, so a second
        # coordinator in this process contends like another process would.
        self.other = LockFileCoordinator(self.root)

    def test_one_holder_at_a_time(self) -> None:
        lease = self.successResultOf(self.coordinator.acquire(DIGEST))
        self.assertIsNotNone(lease)
        self.assertIsNone(self.successResultOf(self.other.acquire(DIGEST)))
        self.assertIsNone(self.other.try_acquire(DIGEST))
        assert lease is not None
        lease.release()
        again = self.other.try_acquire(DIGEST)
        self.assertIsNotNone(again)
        assert again is not None
        again.release()

    def test_holder_announces_where_its_bytes_grow(self) -> None:
        self.assertIsNone(self.successResultOf(self.other.holder(DIGEST)))
        lease = self.coordinator.try_acquire(DIGEST)
        assert lease is not None
        self.assertEqual(self.other.current_holder(DIGEST), FillHolder(str(DIGEST)))
        lease.announce("/cache/tmp/x.1.2", len(BLOB), b"application/x-tar")
        self.assertEqual(
            self.other.current_holder(DIGEST),
            FillHolder(str(DIGEST), "/cache/tmp/x.1.2", len(BLOB), b"application/x-tar"),
        )
        lease.release()
        self.assertIsNone(self.other.current_holder(DIGEST))
        self.assertFalse(os.path.exists(self.coordinator.path(DIGEST)))

    def test_a_lock_file_left_unlocked_holds_nothing(self) -> None:
        """What a holder killed with -9 leaves: its file, unlocked, announced."""
        with open(self.coordinator.path(DIGEST), "w") as left:
            left.write('{"where": "/gone", "size": 3}\n')
        self.assertIsNone(self.other.current_holder(DIGEST))
        lease = self.other.try_acquire(DIGEST)
        self.assertIsNotNone(lease)
        self.assertEqual(self.coordinator.current_holder(DIGEST), FillHolder(str(DIGEST)))

    def test_a_lock_removed_while_taking_it_is_taken_again(self) -> None:
        """The previous holder removed the file between our open and our lock."""
        path = self.coordinator.path(DIGEST)
        first = self.coordinator.try_acquire(DIGEST)
        assert first is not None
        real_open = os.open
        opened: list[str] = []

        def open_then_release(name: Any, flags: int, *args: Any) -> int:
            fd = real_open(name, flags, *args)
            if name == path and not opened:
                opened.append(name)
                first.release()  # unlinks and unlocks: our fd is of the old file
            return fd

        self.patch(os, "open", open_then_release)
        second = self.other.try_acquire(DIGEST)
        self.assertIsNotNone(second)
        self.assertTrue(os.path.exists(path))
        self.assertIsNone(self.coordinator.try_acquire(DIGEST))  # the file at the path is locked

    def test_across_processes_and_a_holder_killed(self) -> None:
        """A forked process holds the lock; killed with -9, the kernel releases it."""
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: hold the lock until killed
            try:
                os.close(ready_r)
                lease = LockFileCoordinator(self.root).try_acquire(DIGEST)
                assert lease is not None
                lease.announce("/cache/tmp/child", 10, b"application/octet-stream")
                os.write(ready_w, b"x")
                signal.pause()
            finally:
                os._exit(0)
        os.close(ready_w)
        self.assertEqual(os.read(ready_r, 1), b"x")
        os.close(ready_r)
        try:
            holder = self.coordinator.current_holder(DIGEST)
            self.assertEqual(holder, FillHolder(str(DIGEST), "/cache/tmp/child", 10))
            self.assertIsNone(self.coordinator.try_acquire(DIGEST))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.assertIsNone(self.coordinator.current_holder(DIGEST))
        self.assertIsNotNone(self.coordinator.try_acquire(DIGEST))


class SiblingFillTests(SynchronousTestCase):
    """Following a fill that another process runs (simulated with files here)."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.store = BlobStore(self.root)
        self.store.open()
        self.holder_side = LockFileCoordinator(self.root)
        self.holder_side.open()
        self.lease = self.holder_side.try_acquire(DIGEST)
        assert self.lease is not None
        self.temporary = self.store.temporary_path(DIGEST)
        self.clock = Clock()
        self.follower_side = LockFileCoordinator(self.root)
        self.fill = SiblingFill(
            DIGEST, self.store, self.follower_side.current_holder, self.clock, stall=30
        )
        self.fill.start()

    def write(self, data: bytes) -> None:
        with open(self.temporary, "ab") as f:
            f.write(data)

    def poll(self) -> None:
        self.clock.advance(0.02)

    def commit(self) -> None:
        self.store.commit(self.temporary, DIGEST)
        assert self.lease is not None
        self.lease.release()

    def test_started_once_announced(self) -> None:
        started = self.fill.when_started()
        self.poll()
        self.assertNoResult(started)
        self.write(b"")
        assert self.lease is not None
        self.lease.announce(self.temporary, len(BLOB), b"application/x-tar")
        self.poll()
        self.assertIs(self.successResultOf(started), self.fill)
        self.assertEqual(
            (self.fill.size, self.fill.content_type), (len(BLOB), b"application/x-tar")
        )

    def test_readers_get_exact_bytes_and_the_last_only_once_stored(self) -> None:
        self.write(BLOB[:4000])
        assert self.lease is not None
        self.lease.announce(self.temporary, len(BLOB), b"application/octet-stream")
        self.poll()
        consumer = FakeConsumer()
        reader = BlobReader(consumer, self.clock, self.fill.path, 0, len(BLOB), self.fill, 1000)  # type: ignore[arg-type]
        reader.begin()
        self.clock.advance(0)
        self.assertEqual(consumer.received, BLOB[:4000])
        self.write(BLOB[4000:])
        for _ in range(3):
            self.poll()
        self.assertEqual(self.fill.readable, len(BLOB) - 1)
        self.assertEqual(consumer.received, BLOB[:-1])  # not verified yet: not all
        self.assertNoResult(reader.done)
        self.commit()  # verified, renamed into the store: still readable
        self.poll()
        self.clock.advance(0)
        self.assertTrue(self.fill.complete)
        self.assertEqual(consumer.received, BLOB)
        self.assertEqual(self.successResultOf(reader.done), len(BLOB))
        self.successResultOf(self.fill.finished)

    def test_holder_gone_without_storing_is_a_local_failure(self) -> None:
        """Readers then go on from upstream at the byte they reached."""
        self.write(BLOB[:3000])
        assert self.lease is not None
        self.lease.announce(self.temporary, len(BLOB), b"application/octet-stream")
        self.poll()
        self.assertTrue(self.fill.path.startswith("/proc/self/fd/"))
        self.lease.release()  # as the kernel does for a process killed mid-fill
        self.poll()
        self.assertIsInstance(self.fill.failure, LocalCacheError)
        self.successResultOf(self.fill.finished)
        self.clock.advance(0)
        # Its descriptor closed, never named again (the number may be reused).
        self.assertEqual(self.fill.path, self.temporary)

    def test_holder_gone_before_announcing(self) -> None:
        started = self.fill.when_started()
        assert self.lease is not None
        self.lease.release()
        self.poll()
        self.failureResultOf(started, LocalCacheError)

    def test_a_stalled_holder_times_out(self) -> None:
        started = self.fill.when_started()
        for _ in range(1501):
            self.poll()
        self.failureResultOf(started, UpstreamTimeout)

    def test_already_stored(self) -> None:
        self.write(BLOB)
        self.commit()
        self.poll()
        self.assertTrue(self.fill.complete)
        self.assertEqual(self.fill.path, self.store.path(DIGEST))
        self.successResultOf(self.fill.when_started())


class TwoProcessesOneDirectoryTests(SynchronousTestCase):
    """Two apps (as two workers) on one cache directory and one upstream."""

    def setUp(self) -> None:
        cache_dir = self.mktemp()
        world = FakeUpstream()
        self.first = Mirror(cache_dir=cache_dir, world=world)
        self.second = Mirror(cache_dir=cache_dir, world=world)
        self.world = world
        self.digest = world.add_blob(BLOB)
        self.path = f"/v2/alpine/blobs/{self.digest}"

    def flush(self) -> None:
        for _ in range(20):
            self.first.flush()
            self.second.flush()
            self.first.clock.advance(0.02)
            self.second.clock.advance(0.02)

    def test_the_second_follows_the_first_fill(self) -> None:
        self.world.hold_blobs = True
        first = self.first.agent.request(b"GET", f"http://mirror.test{self.path}".encode())
        self.first.flush()
        second = self.second.agent.request(b"GET", f"http://mirror.test{self.path}".encode())
        self.world.release()
        self.flush()
        one, two = self.successResultOf(first), self.successResultOf(second)
        self.assertEqual(header(one, b"cache-status"), "hammal; fwd=miss")
        self.assertEqual(
            header(two, b"cache-status"), "hammal; fwd=miss; collapsed; detail=coalesced"
        )
        bodies = [
            read_all(self, mirror, response)
            for mirror, response in ((self.first, one), (self.second, two))
        ]
        self.assertEqual(bodies, [BLOB, BLOB])
        self.assertEqual(len([s for s in self.world.hits(CDN) if s.method == "GET"]), 1)
        self.assertEqual(self.second.blobs.fetches_started, 0)  # type: ignore[union-attr]
        later = self.second.request(b"GET", self.path)
        self.assertEqual(header(later, b"cache-status"), "hammal; hit")


def read_all(case: TwoProcessesOneDirectoryTests, mirror: Mirror, response: Any) -> Any:
    from hammal.stream import read_body

    d = read_body(response, 1 << 24)
    case.flush()
    return case.successResultOf(d)


class TakeOverTests(SynchronousTestCase):
    """The process filling a blob dies: one fill here takes over for every reader."""

    def test_readers_of_a_dead_fill_share_the_fill_that_takes_over(self) -> None:
        cache_dir = self.mktemp()
        world = FakeUpstream()
        mirror = Mirror(cache_dir=cache_dir, world=world)
        digest = world.add_blob(BLOB)
        parsed = Digest.parse(digest)
        # Another process holds the fill and wrote 3000 bytes.
        other = LockFileCoordinator(cache_dir)
        lease = other.try_acquire(parsed)
        assert lease is not None and mirror.blobs is not None
        temporary = mirror.blobs.store.temporary_path(parsed)
        with open(temporary, "wb") as f:
            f.write(BLOB[:3000])
        lease.announce(temporary, len(BLOB), b"application/octet-stream")
        path = f"/v2/alpine/blobs/{digest}"
        pending = [
            mirror.agent.request(b"GET", f"http://mirror.test{path}".encode()) for _ in range(2)
        ]
        for _ in range(5):
            mirror.flush()
            mirror.clock.advance(0.02)
        responses = [self.successResultOf(d) for d in pending]
        self.assertEqual(
            [header(r, b"cache-status") for r in responses],
            ["hammal; fwd=miss; collapsed; detail=coalesced"] * 2,
        )
        self.assertEqual(len(world.hits(CDN)), 0)
        world.hold_blobs = True  # the fill that takes over stays in flight a while
        lease.release()  # what the kernel does when that process is killed
        for _ in range(5):
            mirror.flush()
            mirror.clock.advance(0.02)
        self.assertEqual(len(mirror.blobs.transfers()), 1)  # one fill, both readers on it
        world.release()

        def body(response: Any) -> Any:
            from hammal.stream import read_body

            d = read_body(response, 1 << 24)
            for _ in range(20):
                mirror.flush()
                mirror.clock.advance(0.02)
            return self.successResultOf(d)

        self.assertEqual([body(r) for r in responses], [BLOB, BLOB])
        self.assertEqual(len([s for s in world.hits(CDN) if s.method == "GET"]), 1)
        self.assertEqual(mirror.blobs.fetches_started, 1)
        later = mirror.request(b"GET", path)
        self.assertEqual(header(later, b"cache-status"), "hammal; hit")

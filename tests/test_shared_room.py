"""``--cache-max-size`` for a directory shared by several processes (L{SharedRoom})."""

from __future__ import annotations

import hashlib
import os
import signal

from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.shared_room import SharedRoom
from hammal.cache.store import BlobStore, FreeSpaceFloor
from hammal.reference import Digest

MB = 1000 * 1000
CAP = 10 * MB


def blob(seed: int, size: int = 3 * MB) -> tuple[Digest, bytes]:
    data = bytes([seed]) * size
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest()), data


def directory_blobs(root: str) -> int:
    total = 0
    for folder, _, names in os.walk(os.path.join(root, "blobs")):
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names)
    return total


class SharedRoomTests(SynchronousTestCase):
    """Two stores on one directory, as two processes (pids 101 and 202) see it."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.alive = {101: True, 202: True}
        self.first = self.store(101)
        self.second = self.store(202)

    def store(self, pid: int) -> BlobStore:
        store = BlobStore(self.root, CAP, FreeSpaceFloor(size=0))
        store.shared = SharedRoom(self.root, pid=pid, alive=lambda p: self.alive.get(p, False))
        store.shared.open()
        store.open()
        return store

    def fill(self, store: BlobStore, seed: int) -> Digest:
        digest, data = blob(seed)
        self.assertTrue(store.reserve(len(data)), f"no room for blob {seed}")
        temporary = store.temporary_path(digest)
        with open(temporary, "wb") as f:
            f.write(data)
        store.wrote(len(data))
        store.commit(temporary, digest, len(data), len(data))
        return digest

    def test_the_cap_holds_for_the_directory(self) -> None:
        """Alternating fills: alone each would keep 9 MB, together 18 MB."""
        for seed in range(6):
            self.fill(self.first if seed % 2 else self.second, seed)
            self.assertLessEqual(directory_blobs(self.root), CAP)
        self.assertEqual(directory_blobs(self.root), 9 * MB)

    def test_fills_in_flight_of_the_other_count(self) -> None:
        self.assertTrue(self.first.reserve(6 * MB))
        self.assertFalse(self.second.reserve(6 * MB))  # nothing to evict: refused
        self.assertTrue(self.second.reserve(4 * MB))
        self.first.unreserve(6 * MB)
        self.assertTrue(self.second.reserve(6 * MB))

    def test_a_dead_process_reservation_is_ignored(self) -> None:
        self.assertTrue(self.first.reserve(6 * MB))
        self.alive[101] = False
        self.assertTrue(self.second.reserve(6 * MB))
        self.assertFalse(os.path.exists(os.path.join(self.root, "reservations", "101")))

    def test_indexes_forget_blobs_the_other_evicted(self) -> None:
        old = self.fill(self.first, 1)
        self.fill(self.second, 2)
        self.fill(self.second, 3)
        self.fill(self.second, 4)  # evicts the oldest: the first's blob
        self.assertFalse(os.path.exists(self.first.path(old)))
        self.first.reserve(0)
        self.assertNotIn(str(old), self.first.digests())
        self.assertEqual(self.first.total_size, 9 * MB)

    def test_rescans_only_when_another_process_changed_blobs(self) -> None:
        self.fill(self.second, 1)
        scans: list[int] = []
        rescan = self.first._rescan

        def counted() -> None:
            scans.append(1)
            rescan()

        self.patch(self.first, "_rescan", counted)
        self.assertTrue(self.first.reserve(MB))
        self.assertEqual(len(scans), 1)  # the other stored a blob since we last looked
        self.assertTrue(self.first.reserve(MB))
        self.assertEqual(len(scans), 1)  # nothing changed: our index is right
        self.fill(self.second, 2)
        self.assertTrue(self.first.reserve(MB))
        self.assertEqual(len(scans), 2)
        self.assertEqual(self.first.total_size, 6 * MB)

    def test_alone_no_rescan(self) -> None:
        """A process alone keeps its own index (no rescan per reservation)."""
        alone_root = self.mktemp()
        store = BlobStore(alone_root, CAP, FreeSpaceFloor(size=0))
        store.shared = SharedRoom(alone_root, pid=303, alive=lambda p: False)
        store.shared.open()
        store.open()
        scans: list[int] = []
        self.patch(store, "_rescan", lambda: scans.append(1))
        self.assertTrue(store.reserve(MB))
        self.assertEqual(scans, [])


class SharedRoomAcrossProcessesTests(SynchronousTestCase):
    def test_a_forked_process_reservation_counts_until_it_is_killed(self) -> None:
        root = self.mktemp()
        store = BlobStore(root, CAP, FreeSpaceFloor(size=0))
        store.shared = SharedRoom(root)
        store.shared.open()
        store.open()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_r)
                other = BlobStore(root, CAP, FreeSpaceFloor(size=0))
                other.shared = SharedRoom(root)
                other.shared.open()
                other.open()
                ok = other.reserve(7 * MB)
                os.write(ready_w, b"1" if ok else b"0")
                signal.pause()
            finally:
                os._exit(0)
        os.close(ready_w)
        self.assertEqual(os.read(ready_r, 1), b"1")
        os.close(ready_r)
        try:
            self.assertFalse(store.reserve(4 * MB))
            self.assertTrue(store.reserve(3 * MB))
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.assertTrue(store.reserve(7 * MB))

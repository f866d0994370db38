"""
L{SharedRoom} keeps its file I/O off the event loop where it can: what a
commit or the end of a fill changes is published on the offload, at most
one write in flight, the latest value winning; a reservation is still
published under the directory's lock before it is granted.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from hammal.cache.shared_room import SharedRoom
from hammal.cache.store import BlobStore, FreeSpaceFloor
from tests.test_shared_room import CAP, MB, blob


class _HeldOffload:
    """An offload whose jobs run only when the test says so."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_one(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as error:
            d.errback(error)
        else:
            d.callback(result)


class PublishOffTheLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        self.offload = _HeldOffload()
        self.store = BlobStore(self.root, CAP, FreeSpaceFloor(size=0))
        self.store.shared = SharedRoom(
            self.root, pid=101, alive=lambda p: True, offload=self.offload
        )
        self.store.shared.open()
        self.store.open()
        self.published = os.path.join(self.root, "reservations", "101")

    def read(self) -> tuple[int, int]:
        with open(self.published) as f:
            reserved, changes = f.read().split()
        return int(reserved), int(changes)

    def commit(self, seed: int) -> None:
        digest, data = blob(seed)
        self.assertTrue(self.store.reserve(len(data)))
        temporary = self.store.temporary_path(digest)
        with open(temporary, "wb") as f:
            f.write(data)
        self.store.commit(temporary, digest, len(data), len(data))

    def test_reservation_published_before_granted(self) -> None:
        """A reservation is in the file when reserve returns (the others must see it)."""
        self.assertTrue(self.store.reserve(2 * MB))
        self.assertEqual(self.read(), (2 * MB, 0))
        self.assertEqual(self.offload.jobs, [])

    def test_commit_publishes_on_the_offload(self) -> None:
        """A commit's change is written by an offloaded job, not in the call."""
        self.commit(1)
        self.assertEqual(self.read(), (3 * MB, 0))  # what reserve published
        self.assertEqual(len(self.offload.jobs), 1)
        self.offload.run_one()
        self.assertEqual(self.read(), (0, 1))
        self.assertEqual(self.offload.jobs, [])

    def test_one_write_in_flight_latest_wins(self) -> None:
        """
        Changes while a write is in flight start no second one; when it
        ends, one more write publishes the latest value.
        """
        self.store.reserve(2 * MB)
        self.store.unreserve(MB)
        self.store.unreserve(MB // 2)
        self.assertEqual(len(self.offload.jobs), 1)
        self.store.unreserve(MB // 4)
        self.assertEqual(len(self.offload.jobs), 1)
        self.offload.run_one()
        latest = (2 * MB - MB - MB // 2 - MB // 4, 0)
        self.assertEqual(self.read(), latest)  # the job wrote the latest it found
        self.assertEqual(self.offload.jobs, [])  # nothing newer to write

    def test_change_during_a_write_written_after_it(self) -> None:
        """A value that changed while the job ran is published by the next one."""
        self.store.reserve(2 * MB)
        self.store.unreserve(MB)
        f, args, d = self.offload.jobs.pop(0)
        result = f(*args)  # the job ran with (1 MB, 0) ...
        self.store.unreserve(MB // 2)  # ... and this came before its result
        d.callback(result)
        self.assertEqual(self.read(), (MB, 0))
        self.assertEqual(len(self.offload.jobs), 1)
        self.offload.run_one()
        self.assertEqual(self.read(), (MB // 2, 0))

    def test_late_write_never_undoes_a_reservation(self) -> None:
        """
        A write still queued when a new reservation is published under the
        lock writes that newer value, never the older one it was started for.
        """
        self.store.reserve(2 * MB)
        self.store.unreserve(2 * MB)  # a job queued for (0, 0)
        self.assertTrue(self.store.reserve(3 * MB))  # published at once
        self.assertEqual(self.read(), (3 * MB, 0))
        self.offload.run_one()
        self.assertEqual(self.read(), (3 * MB, 0))

    def test_failing_write_not_retried_in_a_loop(self) -> None:
        """A write that fails is not started again until something changes."""
        self.store.reserve(2 * MB)
        os.chmod(os.path.join(self.root, "reservations"), 0o500)
        self.addCleanup(os.chmod, os.path.join(self.root, "reservations"), 0o700)
        if os.access(os.path.join(self.root, "reservations"), os.W_OK):
            # root writes anyway: make the write fail another way
            self.patch(os, "replace", _refuse)
        self.store.unreserve(MB)
        self.offload.run_one()
        self.assertEqual(self.offload.jobs, [])
        self.assertEqual(self.read(), (2 * MB, 0))


def _refuse(*args: Any) -> None:
    raise OSError(28, "No space left on device")

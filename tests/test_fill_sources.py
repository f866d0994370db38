"""
Tests for L{hammal.cache.sources.ReadThrough}: a fill asks the storage's
other tiers first and goes upstream only when the blob is nowhere, with
the storage keeping a copy; the cluster's sources extend it
(tests/test_cluster_fill.py).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse

from hammal.cache.sources import ReadThrough
from hammal.reference import Digest

DIGEST = Digest.of(b"blob")


class Storage:
    """The tier half of a storage: C{stored} answers read-throughs, C{kept} records keeps."""

    def __init__(self, stored: Any = None) -> None:
        self.stored = stored
        self.asked: list[int] = []
        self.kept: list[Any] = []
        self.keeping: Deferred[bool] = Deferred()

    def read_through(self, digest: Digest, offset: int) -> Deferred[Any]:
        self.asked.append(offset)
        return succeed(self.stored)

    def keep(self, fill: Any) -> Deferred[bool]:
        self.kept.append(fill)
        return self.keeping


class Fill:
    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred()


class ReadThroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.upstream: list[tuple[int, int | None]] = []

    def start_upstream(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        self.upstream.append((offset, end))
        return succeed("upstream's answer")  # type: ignore[arg-type]

    def source(self, storage: Storage) -> Any:
        source = ReadThrough(storage).for_fill(DIGEST, self.start_upstream)  # type: ignore[arg-type]
        self.fill = Fill()
        source.attach(self.fill)
        return source

    def test_stored_elsewhere(self) -> None:
        """The storage's copy is streamed in; upstream is never asked, nothing is kept."""
        storage = Storage(stored="the bucket's answer")
        source = self.source(storage)
        self.assertEqual(self.successResultOf(source.start(0)), "the bucket's answer")
        self.assertEqual(self.successResultOf(source.start(10)), "the bucket's answer")
        self.assertEqual((storage.asked, self.upstream, storage.kept), ([0, 10], [], []))

    def test_nowhere_goes_upstream_and_keeps(self) -> None:
        """
        Nowhere else: upstream, and the storage keeps the fill; resumes go
        straight upstream (the storage is not asked again).
        """
        storage = Storage()
        source = self.source(storage)
        self.assertEqual(self.successResultOf(source.start(0)), "upstream's answer")
        self.assertEqual(self.successResultOf(source.start(100)), "upstream's answer")
        self.assertEqual(storage.asked, [0])
        self.assertEqual(self.upstream, [(0, None), (100, None)])
        self.assertEqual(storage.kept, [self.fill])

    def test_ranged_reads_are_not_fills(self) -> None:
        """A ranged read of its own goes upstream as asked, and is not kept."""
        storage = Storage(stored="the bucket's answer")
        source = self.source(storage)
        self.assertEqual(self.successResultOf(source.start(5, 9)), "upstream's answer")
        self.assertEqual((storage.asked, self.upstream, storage.kept), ([], [(5, 9)], []))

    def test_kept_after_the_fill_and_its_copy(self) -> None:
        """L{kept} runs once the fill ended and the storage settled its copy, not before."""
        storage = Storage()
        source = self.source(storage)
        settled: list[bool] = []
        source.kept = settled.append
        source.start(0)
        self.fill.finished.callback(None)
        self.assertEqual(settled, [])
        storage.keeping.callback(True)
        self.assertEqual(settled, [True])

    def test_kept_without_a_copy(self) -> None:
        """A fill that never went upstream settles at once when it ends (nothing to keep)."""
        storage = Storage(stored="the bucket's answer")
        source = self.source(storage)
        settled: list[bool] = []
        source.kept = settled.append
        source.start(0)
        self.fill.finished.callback(None)
        self.assertEqual(settled, [False])

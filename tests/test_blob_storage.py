"""
Tests for L{hammal.cache.storage.BlobStorage}: one contract, run against
both implementations: the local directory alone
(L{hammal.cache.store.BlobStore}) and the local directory over an object
store (L{hammal.storage.blobs.S3BlobStorage}, on an in-memory fake of the
object store's interface; C{tests/cluster/} runs the real S3 client against
SeaweedFS).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import treq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from hammal import metrics
from hammal.cache.growing import FillNews
from hammal.cache.storage import BlobStorage
from hammal.cache.store import BlobStore, FreeSpaceFloor
from hammal.reference import Digest
from hammal.storage.blobs import S3BlobStorage
from hammal.storage.health import StoreHealth
from hammal.storage.objects import object_key
from hammal.storage.s3 import S3NotFound

BLOB = b"0123456789" * 3


def _digest(data: bytes) -> Digest:
    return Digest.of(data)


@implementer(IResponse)
class MemoryResponse:
    """An unbuffered response with C{body}, delivered at once."""

    def __init__(self, body: bytes) -> None:
        self.code = 200
        self.phrase = b"OK"
        self.version = (b"HTTP", 1, 1)
        self.headers = Headers({b"content-type": [b"binary/octet-stream"]})
        self.length = len(body)
        self.request = None
        self.previousResponse = None
        self._body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


class MemoryUpload:
    """An object being written to L{MemoryObjects}: invisible until complete."""

    def __init__(self, objects: "MemoryObjects", key: str) -> None:
        self._objects = objects
        self.key = key
        self.size = 0
        self._data = b""

    def write(self, data: bytes) -> Deferred[None]:
        if self._objects.down:
            return fail(ConnectionRefusedError("the store is down"))
        self._data += data
        self.size += len(data)
        return succeed(None)

    def complete(self) -> Deferred[None]:
        if self._objects.down:
            return fail(ConnectionRefusedError("the store is down"))
        self._objects.objects[self.key] = self._data
        self._objects.open.discard(self)
        return succeed(None)

    def abort(self) -> Deferred[None]:
        self._objects.open.discard(self)
        return succeed(None)


class MemoryObjects:
    """
    An in-memory L{hammal.storage.objects.ObjectStore}: completed objects
    by key, the uploads still open, and C{down} to fail every request.
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.open: set[MemoryUpload] = set()
        self.down = False
        self.reads = 0

    def open_upload(self, key: str) -> MemoryUpload:
        upload = MemoryUpload(self, key)
        self.open.add(upload)
        return upload

    def read(self, key: str, start: int = 0, end: int | None = None) -> Deferred[IResponse]:
        self.reads += 1
        if self.down:
            return fail(ConnectionRefusedError("the store is down"))
        if key not in self.objects:
            return fail(S3NotFound(404, "NoSuchKey", key))
        return succeed(MemoryResponse(self.objects[key][start:end]))

    def exists(self, key: str) -> Deferred[bool]:
        return succeed(key in self.objects)

    def size(self, key: str) -> Deferred[int | None]:
        data = self.objects.get(key)
        return succeed(None if data is None else len(data))

    def delete(self, key: str) -> Deferred[None]:
        self.objects.pop(key, None)
        return succeed(None)


class FakeFill(FillNews):
    """A fill as the storage sees it (a L{GrowingFill}), written by the test."""

    def __init__(self, path: str, data: bytes) -> None:
        super().__init__()
        self.digest = _digest(data)
        self.path = path
        self.size: int | None = len(data)
        self.written = 0
        self.readable = 0
        self.verified = False
        self.complete = False
        self.failure: Any = None
        self.content_type = b"application/octet-stream"
        self.finished: Deferred[None] = Deferred()
        self._started = False
        open(path, "wb").close()

    def when_started(self) -> Deferred[Any]:
        if self._started:
            return succeed(self)
        if self.failure is not None:
            return fail(self.failure)
        return self._wait_for_start()

    def take_response(self) -> IResponse | None:
        return None

    def start(self) -> None:
        self._started = True
        self._started_now()

    def append(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
        self.written += len(data)
        self._notify()

    def end(self, verified: bool) -> None:
        self.verified = verified
        if not verified:
            self.failure = RuntimeError("the digest did not match")
            self._start_failed(self.failure)
        self._notify()
        self.finished.callback(None)


class BlobStorageContract:
    """
    What every L{BlobStorage} does; a subclass says how to make one
    (L{make}) and another instance sharing its tiers beyond the local
    directory, if any (L{make_peer}).
    """

    tiered = False

    # Set by the TestCase this is mixed into.
    mktemp: Callable[[], str]
    assertEqual: Any
    assertIs: Any
    assertIsNone: Any
    assertTrue: Any
    assertFalse: Any
    successResultOf: Any

    def make(self, max_size: int | None = None) -> BlobStorage:
        raise NotImplementedError()

    def make_peer(self) -> BlobStorage:
        """Another instance (its own local directory) over the same tiers."""
        raise NotImplementedError()

    def commit(self, storage: BlobStorage, data: bytes) -> Digest:
        """A fill of C{data} written, verified and committed the way BlobFetch does it."""
        digest = _digest(data)
        temporary = storage.temporary_path(digest)
        self.assertTrue(storage.reserve(len(data)))
        with open(temporary, "wb") as f:
            f.write(data)
        storage.wrote(len(data))
        storage.commit(temporary, digest, len(data), len(data))
        self.assertFalse(os.path.exists(temporary))
        return digest

    def read(self, storage: BlobStorage, digest: Digest) -> bytes:
        with open(storage.path(digest), "rb") as f:
            return f.read()

    def read_through(self, storage: BlobStorage, digest: Digest, offset: int) -> bytes | None:
        response = self.successResultOf(storage.read_through(digest, offset))
        if response is None:
            return None
        body: bytes = self.successResultOf(treq.content(response))
        return body

    def kept_fill(self, storage: BlobStorage, data: bytes, verified: bool = True) -> bool:
        """Keep a fill of C{data} that grows in two steps, then ends (C{verified} or not)."""
        fill = FakeFill(self.mktemp(), data)
        keeping = storage.keep(fill)
        fill.start()
        fill.append(data[:7])
        fill.append(data[7:])
        fill.end(verified)
        kept: bool = self.successResultOf(keeping)
        return kept

    # Committed blobs.

    def test_unknown(self) -> None:
        """A blob never committed: no size, nothing held, nothing to read through."""
        storage = self.make()
        digest = _digest(BLOB)
        self.assertIsNone(storage.size(digest))
        self.assertEqual((len(storage), storage.total_size), (0, 0))
        self.assertIsNone(self.read_through(storage, digest, 0))

    def test_commit_then_serve(self) -> None:
        """A committed blob has its size and is served from its local path."""
        storage = self.make()
        digest = self.commit(storage, BLOB)
        self.assertEqual(storage.size(digest), len(BLOB))
        self.assertEqual(self.read(storage, digest), BLOB)
        self.assertEqual((len(storage), storage.total_size), (1, len(BLOB)))

    def test_temporary_paths_are_unique(self) -> None:
        storage = self.make()
        digest = _digest(BLOB)
        self.assertEqual(len({storage.temporary_path(digest) for _ in range(5)}), 5)

    def test_remove(self) -> None:
        """A removed blob is gone locally; removing it again is no error."""
        storage = self.make()
        digest = self.commit(storage, BLOB)
        storage.remove(digest)
        self.assertIsNone(storage.size(digest))
        self.assertFalse(os.path.exists(storage.path(digest)))
        self.assertEqual(len(storage), 0)
        storage.remove(digest)

    # Room.

    def test_use_decides_eviction(self) -> None:
        """Making room evicts the least recently used blob: a touch saves one."""
        storage = self.make(max_size=25)
        older = self.commit(storage, b"a" * 10)
        newer = self.commit(storage, b"b" * 10)
        storage.touch(older)
        self.assertTrue(storage.reserve(10))
        self.assertEqual(storage.size(older), 10)
        self.assertIsNone(storage.size(newer))

    def test_pinned_blobs_stay(self) -> None:
        """A pinned blob is never evicted; a refused reservation evicts nothing."""
        storage = self.make(max_size=20)
        one = self.commit(storage, b"a" * 10)
        two = self.commit(storage, b"b" * 10)
        storage.pin(one)
        storage.pin(two)
        self.assertFalse(storage.reserve(10))
        self.assertEqual((storage.size(one), storage.size(two)), (10, 10))
        storage.unpin(two)
        self.assertTrue(storage.reserve(10))
        self.assertEqual(storage.size(one), 10)
        self.assertIsNone(storage.size(two))

    def test_reservations_are_given_back(self) -> None:
        """Reserved room is taken until a fill that ends uncommitted gives it back."""
        storage = self.make(max_size=20)
        self.assertFalse(storage.reserve(21))
        self.assertTrue(storage.reserve(20))
        self.assertFalse(storage.reserve(1))
        storage.wrote(5)
        storage.unreserve(20, 5)
        self.assertTrue(storage.reserve(20))

    # Tiers beyond the local directory.

    def test_verified_fill_is_kept_where_peers_find_it(self) -> None:
        """
        A verified fill is kept by a tiered storage, where another instance
        reads it through from any offset; an untiered one keeps nothing.
        """
        storage = self.make()
        kept = self.kept_fill(storage, BLOB)
        self.assertEqual(kept, self.tiered)
        peer = self.make_peer()
        digest = _digest(BLOB)
        self.assertEqual(self.read_through(peer, digest, 3), BLOB[3:] if kept else None)
        self.assertIsNone(peer.size(digest))  # read through into a fill, not committed by it

    def test_failed_fill_is_never_kept(self) -> None:
        """A fill that fails its digest is kept nowhere: no peer ever reads it."""
        storage = self.make()
        self.assertIs(self.kept_fill(storage, BLOB, verified=False), False)
        self.assertIsNone(self.read_through(self.make_peer(), _digest(BLOB), 0))

    def test_fill_that_never_started(self) -> None:
        """A fill that fails before its file exists: nothing kept, no error."""
        storage = self.make()
        fill = FakeFill(self.mktemp(), BLOB)
        keeping = storage.keep(fill)
        fill.end(verified=False)
        self.assertIs(self.successResultOf(keeping), False)


class LocalBlobStorageTests(BlobStorageContract, SynchronousTestCase):
    """The contract for the local directory alone."""

    def make(self, max_size: int | None = None) -> BlobStorage:
        store = BlobStore(self.mktemp(), max_size, FreeSpaceFloor(size=0))
        store.open()
        return store

    def make_peer(self) -> BlobStorage:
        return self.make()


class S3BlobStorageTests(BlobStorageContract, SynchronousTestCase):
    """The contract for the local directory over an object store, and its own duties."""

    tiered = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.objects = MemoryObjects()
        self.health = StoreHealth(self.clock, retry_after=5.0)

    def make(self, max_size: int | None = None) -> S3BlobStorage:
        store = BlobStore(self.mktemp(), max_size, FreeSpaceFloor(size=0))
        store.open()
        return S3BlobStorage(store, self.objects, self.health)

    def make_peer(self) -> BlobStorage:
        return self.make()

    def test_upload_only_once_verified(self) -> None:
        """The object appears only once the fill verified it, and no upload is left open."""
        storage = self.make()
        fill = FakeFill(self.mktemp(), BLOB)
        keeping = storage.keep(fill)
        fill.start()
        fill.append(BLOB)
        key = object_key("blobs", str(fill.digest))
        self.assertNotIn(key, self.objects.objects)
        fill.end(verified=True)
        self.assertIs(self.successResultOf(keeping), True)
        self.assertEqual(self.objects.objects[key], BLOB)
        self.assertEqual(self.objects.open, set())

    def test_local_removal_keeps_the_bucket_copy(self) -> None:
        """Evicting or removing the local copy leaves the verified object in the bucket."""
        storage = self.make()
        self.assertTrue(self.kept_fill(storage, BLOB))
        digest = self.commit(storage, BLOB)
        storage.remove(digest)
        self.assertEqual(self.read_through(storage, digest, 0), BLOB)

    def test_store_down_is_skipped_for_a_while(self) -> None:
        """
        A store that fails a read is counted and left alone for a while
        (a miss, not an error); it is asked again after that.
        """
        storage = self.make()
        self.assertTrue(self.kept_fill(storage, BLOB))
        digest = _digest(BLOB)
        before = metrics.object_store_failures.labels("read")._value.get()
        self.objects.down = True
        self.assertIsNone(self.read_through(storage, digest, 0))
        self.assertEqual(metrics.object_store_failures.labels("read")._value.get(), before + 1)
        reads = self.objects.reads
        self.objects.down = False
        self.assertIsNone(self.read_through(storage, digest, 0))
        self.assertEqual(self.objects.reads, reads)
        self.clock.advance(5.0)
        self.assertEqual(self.read_through(storage, digest, 0), BLOB)

    def test_read_through_is_a_blob(self) -> None:
        """Whatever type the store gives an object, it is read through as a blob."""
        storage = self.make()
        self.assertTrue(self.kept_fill(storage, BLOB))
        response = self.successResultOf(storage.read_through(_digest(BLOB), 0))
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/octet-stream"]
        )

    def test_upload_failure_is_the_stores(self) -> None:
        """An upload the store fails is aborted and counted; the fill is not failed by it."""
        storage = self.make()
        before = metrics.object_store_failures.labels("upload")._value.get()
        self.objects.down = True
        self.assertIs(self.kept_fill(storage, BLOB), False)
        self.assertEqual(metrics.object_store_failures.labels("upload")._value.get(), before + 1)
        self.assertEqual(self.objects.objects, {})
        self.assertEqual(self.objects.open, set())

"""
Blobs in an S3 bucket under the local cache directory: L{S3BlobStorage}.

The second L{hammal.cache.storage.BlobStorage} (the first is the local
directory alone, L{hammal.cache.store.BlobStore}). Clients are always
served from the local directory, a bounded read-through cache of the
bucket; the bucket is the tier every instance shares:

- a local miss is looked for in the bucket (L{S3BlobStorage.read_through}):
  whatever is there was verified by whoever stored it, and it streams into
  the local fill with C{Range} like an upstream answer;
- a fill that goes upstream is kept (L{S3BlobStorage.keep}): its file is
  uploaded while it grows (L{hammal.storage.follow.FileUpload}) and the
  upload is completed only after the fill verified the digest, so the
  bucket never holds an object that is not what its key says.

A bucket that fails never fails a pull: it is skipped for a while
(L{hammal.storage.health.StoreHealth}), with a warning and
C{hammal_object_store_failures}; the blob is cached locally only.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.growing import GrowingFill
from hammal.cache.store import BlobStore
from hammal.reference import Digest
from hammal.storage.follow import FileUpload
from hammal.storage.health import StoreHealth
from hammal.storage.objects import ObjectStore, object_key
from hammal.storage.s3 import S3NotFound

log = Logger()


class S3BlobStorage:
    """
    The local directory C{local} as the serving tier over the object store
    C{objects} (see the module).

    @param health: the store's health, shared with the manifest store.
    """

    def __init__(self, local: BlobStore, objects: ObjectStore, health: StoreHealth) -> None:
        self.local = local
        self.objects = objects
        self.health = health

    # The local tier: where clients are served from.

    def size(self, digest: Digest) -> int | None:
        return self.local.size(digest)

    def path(self, digest: Digest) -> str:
        return self.local.path(digest)

    def touch(self, digest: Digest) -> None:
        self.local.touch(digest)

    def pin(self, digest: Digest) -> None:
        self.local.pin(digest)

    def unpin(self, digest: Digest) -> None:
        self.local.unpin(digest)

    def remove(self, digest: Digest) -> None:
        """Drop the local copy only: the bucket's is still right (it was verified)."""
        self.local.remove(digest)

    @property
    def total_size(self) -> int:
        return self.local.total_size

    def __len__(self) -> int:
        return len(self.local)

    def temporary_path(self, digest: Digest) -> str:
        return self.local.temporary_path(digest)

    def has_room(self, size: int = 0) -> bool:
        return self.local.has_room(size)

    def reserve(self, size: int) -> bool:
        return self.local.reserve(size)

    def wrote(self, size: int) -> None:
        self.local.wrote(size)

    def unreserve(self, size: int, written: int = 0) -> None:
        self.local.unreserve(size, written)

    def commit(self, temporary: str, digest: Digest, reserved: int = 0, written: int = 0) -> None:
        self.local.commit(temporary, digest, reserved, written)

    # The bucket.

    def read_through(self, digest: Digest, offset: int) -> Deferred[IResponse | None]:
        """The stored blob from C{offset}, or L{None} (not stored, or the store failed)."""
        return Deferred.fromCoroutine(self._read_through(digest, offset))

    async def _read_through(self, digest: Digest, offset: int) -> IResponse | None:
        if not self.health.usable():
            return None
        try:
            response = await self.objects.read(object_key("blobs", str(digest)), offset)
        except S3NotFound:
            self.health.answered()
            return None
        except Exception as e:  # noqa: BLE001 - a failing store is skipped, never fatal
            self.health.failed("read", str(e) or type(e).__name__)
            return None
        self.health.answered()
        metrics.cluster_fill_sources.labels("store").inc()
        # Only verified blobs are stored: whatever type the store gives
        # them (some answer text/html for objects stored without one), the
        # bytes are a blob.
        response.headers.setRawHeaders(b"content-type", [b"application/octet-stream"])
        return response

    def keep(self, fill: GrowingFill) -> Deferred[bool]:
        """Upload C{fill}'s file as it grows; complete it once verified (see the module)."""
        digest = str(fill.digest)
        upload = FileUpload(
            fill,
            self.objects.open_upload(object_key("blobs", digest)),
            lambda reason: self.health.failed("upload", reason),
        )
        # The file exists once upstream answered (or already, on a takeover).
        fill.when_started().addCallbacks(lambda _: upload.begin(), lambda _: upload.cancel())

        def settled(stored: bool) -> bool:
            if stored:
                self.health.answered()
                log.info("stored {digest} in the object store", digest=digest)
            return stored

        return upload.done.addCallback(settled)

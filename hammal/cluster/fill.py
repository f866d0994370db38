"""
Where a fill's bytes come from when hammal runs as a cluster: the shared
object store, the instance that holds the digest's fill lease, or upstream.

The blob cache fills a digest through one L{hammal.cache.fetch.BlobFetch},
which asks a C{start(offset)} callable for a response to stream into the
cache file (again with the offset reached, to resume). L{ClusterFills}
gives each fill such a callable (L{FillSource.start}) that tries, in order:

1. the object store (C{--storage s3://...}): a blob stored there was
   verified by whoever stored it; it streams from there with C{Range};
2. the fill lease (C{--redis} and C{--cluster-advertise}): if another
   instance holds it, the bytes stream from that instance's peer endpoint
   with C{Range}; while the holder cannot serve yet (or is dead and its
   lease not yet expired) the source waits and asks again, and once the
   lease is free it takes it;
3. upstream, with the lease held (or a local one when Redis is down).
   A fill that goes upstream also uploads the cache file to the object
   store as it grows (L{hammal.storage.follow.FileUpload}), completes the
   upload only after the digest matched, and releases the lease after
   that, so that a peer that finds the lease free finds the object stored.

Neither Redis nor the store failing turns a pull into an error: the lease
falls back to per-instance single flight (L{hammal.cluster.lease}), and a
store that fails is skipped with a warning and
C{hammal_object_store_failures}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from hammal import metrics
from hammal.cache.blobs import BlobCache
from hammal.cache.bypass import StartUpstream
from hammal.cache.fetch import BlobFetch
from hammal.cluster.lease import FillLeases, HeldElsewhere, Lease
from hammal.cluster.peer import GrowingFile, PeerClient, PeerError
from hammal.errors import DigestInvalid
from hammal.reference import Digest
from hammal.storage.follow import FileUpload
from hammal.storage.health import StoreHealth
from hammal.storage.objects import ObjectStore, object_key
from hammal.storage.s3 import S3NotFound

log = Logger()


class ClusterFills:
    """
    The cluster's sources for the blob cache's fills (see the module).

    @param leases: the fill leases, or L{None} without a cluster.
    @param peers: the client for other instances' peer endpoints.
    @param objects: the shared object store, or L{None} (C{--storage file}).
    @param poll: seconds between looks while another instance holds the
        lease but cannot serve (yet), or a dead holder's lease runs out.
    @param health: the store's health, shared with the manifest store.
    """

    def __init__(
        self,
        clock: IReactorTime,
        leases: FillLeases | None = None,
        peers: PeerClient | None = None,
        objects: ObjectStore | None = None,
        poll: float = 0.25,
        health: StoreHealth | None = None,
    ) -> None:
        self.clock = clock
        self.leases = leases
        self.peers = peers
        self.objects = objects
        self.poll = poll
        self.health = health if health is not None else StoreHealth(clock)

    def for_fill(self, digest: Digest, start_upstream: StartUpstream) -> "FillSource":
        """The source of one fill of C{digest}, upstream being C{start_upstream}."""
        return FillSource(self, digest, start_upstream)

    async def from_objects(self, digest: Digest, offset: int) -> IResponse | None:
        """The stored blob from C{offset}, or L{None} (not stored, or the store failed)."""
        if self.objects is None or not self.health.usable():
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


class FillSource:
    """
    The C{start(offset)} of one fill (see the module); L{attach} it to the
    fill it serves before the fill runs.
    """

    def __init__(self, cluster: ClusterFills, digest: Digest, start_upstream: StartUpstream):
        self._cluster = cluster
        self._digest = digest
        self._upstream = start_upstream
        self._fetch: BlobFetch | None = None
        self._lease: Lease | None = None
        self._upstream_chosen = False
        self._upload: FileUpload | None = None

    def attach(self, fetch: BlobFetch) -> None:
        """Watch C{fetch}: when it ends, finish the upload, then free the lease."""
        self._fetch = fetch
        fetch.finished.addBoth(self._fill_ended)

    def start(self, offset: int, end: int | None = None) -> Deferred[IResponse]:
        """A response with the blob's bytes from C{offset}, from the best source."""
        if end is not None:  # a ranged read of its own: not a fill
            return Deferred.fromCoroutine(self._ranged(offset, end))
        return Deferred.fromCoroutine(self._start(offset))

    async def _ranged(self, offset: int, end: int) -> IResponse:
        return await self._upstream(offset, end)

    async def _start(self, offset: int) -> IResponse:
        cluster = self._cluster
        if not self._upstream_chosen:
            response = await cluster.from_objects(self._digest, offset)
            if response is not None:
                return response
            if cluster.leases is not None and self._lease is None:
                response = await self._from_holder(offset)
                if response is not None:
                    return response
                # Ours now: it may have been stored since we looked.
                response = await cluster.from_objects(self._digest, offset)
                if response is not None:
                    return response
            self._upstream_chosen = True
            self._begin_upload()
        metrics.cluster_fill_sources.labels("upstream").inc()
        return await self._upstream(offset)

    async def _from_holder(self, offset: int) -> IResponse | None:
        """
        The holder's bytes from C{offset}, or L{None} to go upstream: we
        hold the lease now, or the holder refuses our signature.
        """
        cluster = self._cluster
        if cluster.leases is None:
            raise RuntimeError("a holder is asked for without leases")
        digest = str(self._digest)
        while True:
            got = await cluster.leases.acquire(digest)
            if isinstance(got, Lease):
                self._lease = got
                return None
            if not isinstance(got, HeldElsewhere):
                raise RuntimeError(f"unexpected lease answer {got!r}")
            if got.holder != cluster.leases.advertise and cluster.peers is not None:
                try:
                    response = await cluster.peers.fetch(got.holder, digest, offset)
                except PeerError as e:
                    if e.status in (401, 403):
                        # Another cluster key: that instance will not serve
                        # us, however long we wait. Fetch it ourselves.
                        log.warn(
                            "peer {peer} refused our cluster signature; fetching {digest}"
                            " without it (is --cluster-key-file the same everywhere?)",
                            peer=got.holder,
                            digest=digest,
                        )
                        return None
                    log.debug(
                        "peer {peer} cannot serve {digest} yet: {error}",
                        peer=got.holder,
                        digest=digest,
                        error=str(e),
                    )
                else:
                    metrics.cluster_fill_sources.labels("peer").inc()
                    log.info(
                        "streaming {digest} from {peer} at {offset}",
                        digest=digest,
                        peer=got.holder,
                        offset=offset,
                    )
                    return response
            await deferLater(cluster.clock, cluster.poll, lambda: None)

    def _begin_upload(self) -> None:
        cluster, fetch = self._cluster, self._fetch
        if cluster.objects is None or fetch is None or self._upload is not None:
            return
        upload = FileUpload(
            fetch,
            cluster.objects.open_upload(object_key("blobs", str(self._digest))),
            lambda reason: cluster.health.failed("upload", reason),
        )
        self._upload = upload
        # The file exists once upstream answered (or already, on a takeover).
        fetch.when_started().addCallbacks(lambda _: upload.begin(), lambda _: upload.cancel())

    def _fill_ended(self, result: object) -> object:
        upload_done: Deferred[Any] = (
            self._upload.done if self._upload is not None else succeed(None)
        )

        def release(stored: object) -> None:
            if stored is True:
                self._cluster.health.answered()
                log.info("stored {digest} in the object store", digest=str(self._digest))
            if self._lease is not None:
                self._lease.release()

        upload_done.addCallback(release).addErrback(_log_failure)
        return result


def _log_failure(failure: Failure) -> None:
    log.failure("releasing a fill lease failed", failure)


def peer_lookup(blobs: BlobCache) -> Any:
    """
    The peer endpoint's lookup over this instance's blob cache: a fill in
    flight (followed while it grows) or a stored blob, by digest.
    """

    def lookup(text: str) -> GrowingFile | None:
        try:
            digest = Digest.parse(text)
        except DigestInvalid:
            return None
        fetch = blobs.in_flight(digest)
        if fetch is not None and fetch.size is not None and fetch.written > 0:
            return _growing(fetch)
        size = blobs.store.size(digest)
        if size is None:
            return None
        return GrowingFile(blobs.store.path(digest), size, lambda: size, lambda: succeed(None))

    return lookup


def _growing(fetch: BlobFetch) -> GrowingFile:
    size = fetch.size
    if size is None:
        raise RuntimeError("a growing file is asked for before its size is known")

    def when_done() -> Deferred[None]:
        d: Deferred[None] = Deferred()

        def ended(result: object) -> object:
            if fetch.verified:
                d.callback(None)
            else:
                d.errback(Failure(fetch.failure or RuntimeError("the fill failed")))
            return result

        fetch.finished.addBoth(ended)
        return d

    def subscribe(listener: Any) -> Any:
        fetch.subscribe(listener)
        return lambda: fetch.unsubscribe(listener)

    return GrowingFile(fetch.path, size, lambda: fetch.written, when_done, subscribe)
